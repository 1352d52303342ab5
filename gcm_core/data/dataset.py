"""One subset of a dataset described by a card: its videos, proposals and feature files, checked.

This is what preprocessing walks video by video: :meth:`DatasetSource.load` reads one video's
snippet features for every stream and checks them against the video (every stream present,
same T, enough snippets for its duration), raising :class:`FormatError` with the file and video.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from gcm_core.data.annotations import add_ambiguous, read_annotations
from gcm_core.data.cards import DatasetCard, data_root_path
from gcm_core.data.features import align_streams, load_features, split_streams
from gcm_core.data.model import FormatError, Proposals, Video, video_spellings
from gcm_core.data.pooling import SnippetGrid, rate_per_video
from gcm_core.data.proposals import ProposalSource

ROLES = ("train", "test")


@dataclass
class VideoInputs:
    """Everything preprocessing needs of one video."""

    video: Video
    proposals: Proposals
    features: dict[str, np.ndarray]
    grid: SnippetGrid


class DatasetSource:
    """The videos of one role (``train`` or ``test``) of a card's dataset under a data root, less
    any ``leave_out`` names (videos a preprocessing left out as bad, which a one-stage run on the
    preprocessed dataset leaves out too)."""

    def __init__(self, card: DatasetCard, data_root: str | Path | None, role: str,
                 leave_out: Iterable[str] = ()) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.card, self.role = card, role
        self.root = data_root_path(data_root)
        subset = card.subsets[role]
        annotations = card.path("annotations", self.root)
        if not annotations.exists():
            raise FormatError(annotations, f"no such file under the data root {self.root.resolve()} (give the folder "
                                           "the card's paths start from: --data-root or $GCM_DATA_ROOT)")
        annotated = read_annotations(annotations, card)
        left_out = set(leave_out)
        self.videos = {k: v for k, v in annotated.items()
                       if (v.subset or "").lower() == subset.lower() and k not in left_out}
        if not self.videos:
            raise FormatError(annotations, f"no video of subset {subset!r}" + (" but those left out" if left_out else ""))
        if role in (card.paths.get("ambiguous") or {}):
            self._add_ambiguous(card.path(f"ambiguous.{role}", self.root))

    def _add_ambiguous(self, path: Path) -> None:
        """Give the videos the Ambiguous segments the card lists apart from its annotations
        (THUMOS'14's ``Ambiguous_test.txt``, which ``thumos14.json`` leaves out)."""
        if not path.is_file():
            raise FormatError(path, f"no such file under the data root {self.root.resolve()} (the card's "
                                    f"paths.ambiguous.{self.role}: the segments its protocol leaves out of scoring, "
                                    "Ambiguous_test.txt of THUMOS'14's test annotations)")
        add_ambiguous(self.videos, path)

    def check_layout(self, proposals: bool, every_video: bool = False) -> None:
        """Fail once, naming the folder or file, where the data root lacks what every video of the
        role reads (a stream's features folder, frame rates that the card's snippets need; with
        ``proposals``, the role's proposal list), rather than once per video, each with the same
        message. ``every_video``: for readers that need every video of the role (one-stage runs),
        a video's missing feature file too, the first named and the others counted; preprocessing
        names each such video instead, and may leave it out."""
        for stream in self._file_streams:
            folder = self.feature_path(self.video_ids[0], stream).parent
            if not folder.is_dir():
                raise FormatError(folder, f"no {stream} features folder under the data root {self.root.resolve()} "
                                          f"(the card's paths.features: {self.card.paths['features']})")
        self._check_frame_rates(self.video_ids)
        listed = self.card.path(f"proposals.{self.role}", self.root)
        if proposals and not listed.exists():
            raise FormatError(listed, f"no {self.role} proposals under the data root {self.root.resolve()} (the "
                                      f"card's paths.proposals.{self.role})")
        if every_video:
            self._check_feature_files()

    @cached_property
    def proposals(self) -> ProposalSource:
        """Each video's proposals, read when asked for (planning needs only the annotations)."""
        return ProposalSource(self.card.path(f"proposals.{self.role}", self.root), self.videos)

    @property
    def video_ids(self) -> list[str]:
        return sorted(self.videos)

    def feature_path(self, video: str, stream: str) -> Path:
        """The feature file of ``video``: the first of its spellings (an ActivityNet id with or
        without ``v_``) whose file exists, else the card's own spelling."""
        paths = [self.card.path("features", self.root, stream=stream, video=name) for name in video_spellings(video)]
        return next((p for p in paths if p.is_file()), paths[0])

    @property
    def _file_streams(self) -> tuple[str, ...]:
        """The streams named by the feature files: each stream, or the first where one file holds
        every stream's columns (the card's ``snippets.stream_columns``)."""
        return self.card.streams[:1] if self.card.snippets.get("stream_columns") else self.card.streams

    def _check_feature_files(self) -> None:
        files = [(v, self.feature_path(v, stream)) for v in self.video_ids for stream in self._file_streams]
        missing = [(v, path) for v, path in files if not path.is_file()]
        if missing:
            video, path = missing[0]
            more = f" (and {len(missing) - 1} more of the {self.role} videos' files)" if len(missing) > 1 else ""
            raise FormatError(path, f"feature file missing{more}", video=video)

    def _features(self, video_id: str) -> dict[str, np.ndarray]:
        """Every stream's features of ``video_id``: a file each, or one file read once and cut
        into the streams' columns (the card's ``snippets.stream_columns``)."""
        columns = self.card.snippets.get("stream_columns")
        if columns:
            path = self.feature_path(video_id, self.card.streams[0])
            return split_streams(load_features(path, video_id), columns, path, video_id)
        return {s: load_features(self.feature_path(video_id, s), video_id) for s in self.card.streams}

    def grid(self, video: Video, num_snippets: int) -> SnippetGrid:
        snippets = self.card.snippets
        self._check_frame_rates([video.id])
        fps = snippets.get("fps", "native")
        if fps == "native":   # the video's own; rescaled positions lie at no rate in particular
            fps = video.fps if rate_per_video(snippets) else 30.0
        return SnippetGrid.of_layout(snippets, num_snippets, video.duration, fps)

    def _check_frame_rates(self, video_ids: list[str]) -> None:
        """Where the snippets lie on each video's own frame rate, the annotations give each one."""
        unknown = [v for v in video_ids if not self.videos[v].fps] if rate_per_video(self.card.snippets) else []
        if unknown:
            raise FormatError(self.card.path("annotations", self.root),
                              f"no frame rate for {len(unknown)} video(s) (e.g. {unknown[0]}): the card lays snippets "
                              "on each video's own frame rate (snippets.fps: native); give annotations with frame "
                              "rates (THUMOS'14: thumos14.json or thumos14_test_groundtruth.csv) or the card a fixed "
                              "snippets.fps", video=unknown[0], field="fps")

    def failing_videos(self) -> dict[str, str]:
        """The videos whose annotation or snippet features fail their checks, each with the error
        that reading it gives (every video's features are read): what a reader of every video
        may leave out."""
        failing = {}
        for video_id in self.video_ids:
            try:
                self.snippet_features(video_id)
            except FormatError as err:
                failing[video_id] = str(err)
        return failing

    def load(self, video_id: str) -> VideoInputs:
        """One video's proposals and features of every stream, checked against each other."""
        video, features, grid = self.snippet_features(video_id)
        return VideoInputs(video, self.proposals[video_id], features, grid)

    def snippet_features(self, video_id: str) -> tuple[Video, dict[str, np.ndarray], SnippetGrid]:
        """One video's annotation and the features of every stream on their snippet grid, checked
        against each other and the annotation (a one-stage detector reads no proposals)."""
        video = self.videos[video_id]
        if not video.duration:
            raise FormatError(self.card.path("annotations", self.root), "no duration", video=video_id, field="duration")
        features = align_streams(self._features(video_id), self.feature_path(video_id, self.card.streams[0]), video_id)
        dims = self.card.snippets.get("dim")
        for s, f in features.items():
            if dims and f.shape[1] != int(dims):
                raise FormatError(self.feature_path(video_id, s), f"features are {f.shape[1]}-d, the card says {dims}",
                                  video=video_id)
        grid = self.grid(video, next(iter(features.values())).shape[0])
        if grid.misfit():
            raise FormatError(self.feature_path(video_id, self.card.streams[0]), grid.misfit(), video=video_id)
        return video, features, grid
