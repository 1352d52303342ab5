"""Dataset cards: what a dataset is (classes, subsets, streams, protocol) and where its files lie.

Cards are YAML files; the shipped ones live in the repository's ``datasets/`` folder and are
found by name (``load_card("thumos14")``), any other by path. Paths inside a card are relative
to a data root given by ``--data-root`` or the ``GCM_DATA_ROOT`` environment variable.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, get_args

from gcm_core.data.pooling import Convention
from gcm_core.data.yamlio import read_yaml

CARD_DIR = Path(__file__).resolve().parents[2] / "datasets"
LABEL_CONVENTIONS = ("name", "zero_based", "one_based", "official")
REQUIRED_FIELDS = ("name", "classes", "subsets", "streams", "evaluation", "paths")
# label_conventions and proposals describe the files (their readers tell the formats apart);
# relations, structure, stream_profiles and generated are the synthetic generator's
OPTIONAL_FIELDS = ("stream_fusion", "snippets", "units_per_video_test", "label_conventions", "proposals",
                   "relations", "structure", "stream_profiles", "generated")
SNIPPET_FIELDS = ("convention", "stride_frames", "clip_frames", "fps", "dim", "stream_columns", "positions")
PATH_FIELDS = ("annotations", "features", "proposals", "ambiguous")


class CardError(ValueError):
    """A card that cannot be used, or a label it does not know."""


@dataclass(frozen=True)
class DatasetCard:
    name: str
    classes: tuple[str, ...]
    official_index: tuple[int, ...] | None
    subsets: dict[str, str]
    streams: tuple[str, ...]
    stream_fusion: dict[str, float]
    snippets: dict[str, Any]
    evaluation: dict[str, Any]
    units_per_video_test: int
    paths: dict[str, Any]
    source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def protocol(self) -> str:
        return self.evaluation["protocol"]

    @property
    def tiou(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.evaluation["tiou"])

    def class_index(self, label: str | int, convention: str = "name") -> int:
        """0-based class index of ``label`` read under ``convention`` (see LABEL_CONVENTIONS)."""
        try:
            if convention == "name":
                return self._by_name[str(label)]
            value = int(label)
            if convention == "zero_based" and 0 <= value < self.num_classes:
                return value
            if convention == "one_based" and 1 <= value <= self.num_classes:
                return value - 1
            if convention == "official" and self.official_index is not None:
                return self.official_index.index(value)
        except (KeyError, ValueError):
            pass
        if convention not in LABEL_CONVENTIONS:
            raise CardError(f"unknown label convention {convention!r}; choose from {LABEL_CONVENTIONS}")
        raise CardError(f"label {label!r} is not a class of card {self.name!r} ({convention} convention)")

    def label_code(self, index: int, convention: str) -> int | str:
        """The label of 0-based class ``index`` under ``convention`` (inverse of class_index)."""
        if convention == "official" and self.official_index is None:
            raise CardError(f"card {self.name!r} has no official class indices")
        codes = {"name": lambda: self.classes[index], "zero_based": lambda: index,
                 "one_based": lambda: index + 1, "official": lambda: self.official_index[index]}
        if convention not in codes:
            raise CardError(f"unknown label convention {convention!r}; choose from {LABEL_CONVENTIONS}")
        return codes[convention]()

    def is_class(self, label: str | int, convention: str = "name") -> bool:
        try:
            self.class_index(label, convention)
        except CardError:
            return False
        return True

    @cached_property
    def _by_name(self) -> dict[str, int]:
        return {name: k for k, name in enumerate(self.classes)}

    def path(self, key: str, data_root: str | Path | None = None, **fields: str) -> Path:
        """Path of ``paths.<key>`` (dotted keys for nested entries) under the data root."""
        entry: Any = self.paths
        for part in key.split("."):
            if not isinstance(entry, dict) or part not in entry:
                raise CardError(f"card {self.name!r} has no path {key!r}")
            entry = entry[part]
        return data_root_path(data_root) / str(entry).format(**fields)


def data_root_path(data_root: str | Path | None = None) -> Path:
    """The data root: the argument, else ``GCM_DATA_ROOT``, else the working directory."""
    return Path(data_root or os.environ.get("GCM_DATA_ROOT", ".")).expanduser()


def absolute_card(card: str | Path) -> str:
    """A card reference that reads the same from any directory: a shipped card's name as it is,
    a YAML path made absolute."""
    path = Path(card)
    return str(path.resolve()) if path.suffix else str(card)


def shipped_yaml(name_or_path: str | Path, folder: Path, what: str) -> Path:
    """``folder/<name>.yaml`` for a bare name (``thumos14``), else the path given; a missing file
    raises FileNotFoundError listing the shipped ones."""
    path = Path(name_or_path)
    if not path.suffix:
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in folder.glob("*.yaml"))
        raise FileNotFoundError(f"no {what} {str(name_or_path)!r} (shipped {what}s: {shipped})")
    return path


def load_card(name_or_path: str | Path) -> DatasetCard:
    """A card by shipped name (``thumos14``) or by path to a YAML file."""
    try:
        path = shipped_yaml(name_or_path, CARD_DIR, "dataset card")
    except FileNotFoundError as err:
        raise CardError(str(err)) from None
    try:
        raw = read_yaml(path)
    except ValueError as err:
        raise CardError(str(err)) from None
    return card_from_dict(raw, source=path)


def card_from_dict(raw: dict[str, Any], source: Path | None = None) -> DatasetCard:
    where = source or "card"
    missing = [k for k in REQUIRED_FIELDS if k not in (raw or {})]
    if missing:
        raise CardError(f"{where}: missing fields {missing}")
    _check_known(where, "", raw, REQUIRED_FIELDS + OPTIONAL_FIELDS)
    _check_known(where, "paths.", raw["paths"], PATH_FIELDS)
    _check_snippets(where, raw.get("snippets") or {})
    entries = [c if isinstance(c, dict) else {"name": c} for c in raw["classes"]]
    names = tuple(str(c["name"]) for c in entries)
    if len(set(names)) != len(names):
        raise CardError(f"{where}: duplicate class names")
    official = tuple(int(c["official_index"]) for c in entries) if all("official_index" in c for c in entries) else None
    _check_stream_columns(raw, where)
    known = set(REQUIRED_FIELDS) | {"stream_fusion", "snippets", "units_per_video_test"}
    return DatasetCard(
        name=str(raw["name"]),
        classes=names,
        official_index=official,
        subsets=dict(raw["subsets"]),
        streams=tuple(raw["streams"]),
        stream_fusion={k: float(v) for k, v in (raw.get("stream_fusion") or {}).items()},
        snippets=dict(raw.get("snippets") or {}),
        evaluation=dict(raw["evaluation"]),
        units_per_video_test=int(raw.get("units_per_video_test", 100)),
        paths=dict(raw["paths"]),
        source=source,
        extra={k: v for k, v in raw.items() if k not in known},
    )


def _check_known(where: Any, prefix: str, given: dict[str, Any], known: tuple[str, ...]) -> None:
    """A misspelt field (``units_per_video_tests``, ``snippets.stride_frame``, ``paths.ambigous``)
    would leave its default in force unsaid: named, with the field it may mean."""
    unknown = [key for key in given if key not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise CardError(f"{where}: unknown field {prefix}{unknown[0]}{hint}; a card's {prefix.rstrip('.') or 'top-level'} "
                        f"fields are {list(known)}")


def _check_snippets(where: Any, snippets: dict[str, Any]) -> None:
    """The snippet grid's fields and values, checked where the card is read rather than at each
    video its features are laid on."""
    _check_known(where, "snippets.", snippets, SNIPPET_FIELDS)
    convention = snippets.get("convention", "i3d")
    if convention not in get_args(Convention):
        raise CardError(f"{where}: snippets.convention {convention!r} is not one of {list(get_args(Convention))}")
    fps = snippets.get("fps", "native")
    if fps != "native" and not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0):
        raise CardError(f"{where}: snippets.fps must be native (each video's own) or a positive number, got {fps!r}")
    for key in ("stride_frames", "clip_frames", "dim", "positions"):
        value = snippets.get(key, 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise CardError(f"{where}: snippets.{key} must be a whole number >= 1, got {value!r}")


def _check_stream_columns(raw: dict[str, Any], where: Any) -> None:
    """A feature file either holds one stream (``{stream}`` in its path pattern) or every stream
    side by side, each at the ``[start, stop)`` columns ``snippets.stream_columns`` gives."""
    streams = list(raw["streams"])
    columns = (raw.get("snippets") or {}).get("stream_columns")
    per_stream_files = "{stream}" in str(raw["paths"].get("features", "{stream}"))
    if columns is None:
        if len(streams) > 1 and not per_stream_files:
            raise CardError(f"{where}: paths.features has no {{stream}}, so one file holds every stream: give "
                            f"snippets.stream_columns, each stream's [start, stop) columns in it")
        return
    if per_stream_files:
        raise CardError(f"{where}: snippets.stream_columns describes one file holding every stream, but "
                        "paths.features names a file per stream ({stream})")
    valid = isinstance(columns, dict) and set(columns) == set(streams) and all(
        isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(x, int) for x in c) and 0 <= c[0] < c[1]
        for c in columns.values())
    if not valid:
        raise CardError(f"{where}: snippets.stream_columns must give [start, stop) columns for each of the "
                        f"streams {streams}, got {columns!r}")
