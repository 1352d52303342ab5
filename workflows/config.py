"""Stage configurations: one dataclass per stage, defaults = the paper's settings.

Values are resolved in three layers: the dataclass defaults, then a YAML file (``--config``),
then ``--set key=value`` overrides with dotted keys (``--set train.lr=0.01``, ``--set
graph.edge_types=[contextual,semantic]``; values are parsed as YAML, ``1e-3`` being a number:
:mod:`gcm_core.data.yamlio`), each coerced to its field's type (:mod:`workflows.settings`). The
resolved configuration is written beside every output (``config.yaml``), so a run can be repeated
from its folder alone.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from gcm_core.checks import check_ranges
from gcm_core.data.cards import DatasetCard
from gcm_core.data.dataset import ROLES
from gcm_core.data.pooling import PARTS, Reduce
from gcm_core.data.sampling import SamplingConfig
from gcm_core.data.yamlio import read_yaml
from gcm_core.detectors import ModelConfig
from gcm_core.detectors.dssad import DSSADConfig
from gcm_core.engine import TrainConfig
from gcm_core.evaluation import PROTOCOLS
from gcm_core.candidates import CandidateCaps
from gcm_core.graph import GraphSpec
from gcm_core.one_stage import default_recipe
from gcm_core.postprocess import InferenceConfig, stream_weights
from workflows.settings import ConfigError, deep_merge, from_dict, parse_overrides, to_dict, value_at, without_key

T = TypeVar("T")


@dataclass
class RayConfig:
    """Where stages run: ``address`` None starts an embedded local Ray on 127.0.0.1."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        check_ranges(self, num_cpus=">= 1", num_gpus=">= 0")
        if self.object_store_mb < 75:
            raise ValueError(f"object_store_mb must be >= 75 (Ray's least), got {self.object_store_mb}")


@dataclass
class PreprocessConfig:
    card: str = "synthetic"
    data_root: str | None = None
    out: str = "runs/preprocessed"
    roles: tuple[str, ...] = ROLES
    parts: tuple[str, ...] = ("body", "three_part")   # body always; the completeness input of the heads to train
    reduce: Reduce = "max"
    caps: CandidateCaps = field(default_factory=CandidateCaps)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)   # its role thresholds label the units
    videos_per_shard: int = 16          # about; shards are balanced over the workers
    num_workers: int = 2
    use_gpu: bool | None = None          # None: use GPUs when the cluster has them
    skip_bad: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, videos_per_shard=">= 1", num_workers=">= 1")
        _check_names("roles", self.roles, ROLES)
        _check_names("parts", self.parts, PARTS)
        if "body" not in self.parts:
            raise ValueError(f"parts must hold body (every head classifies units by it), got {list(self.parts)}")
        defaults = SamplingConfig()
        unread = [name for name in ("per_video", "ratio") if getattr(self.sampling, name) != getattr(defaults, name)]
        if unread:   # preprocessing gives every unit its role; training samples them
            raise ValueError(f"{' and '.join(f'sampling.{name}' for name in unread)}: how many units of each role "
                             "a training iteration takes is a training setting (gcm train --set "
                             f"train.sampling.{unread[0]}=...); preprocessing reads the role thresholds")


def _check_names(name: str, given: tuple[str, ...], known: tuple[str, ...] | None = None) -> None:
    """``given`` names one or more things (of ``known``, where they are fixed), each once."""
    if not given or len(set(given)) < len(given) or known is not None and not set(given) <= set(known):
        what = f"of {list(known)}" if known is not None else name
        raise ValueError(f"{name} must name one or more {what}, each once, got {list(given)}")


def check_folder_name(key: str, name: object) -> None:
    """``name`` names one folder inside an output folder (a run, an experiment): not empty, no
    path separator, not ``.`` or ``..``, so that outputs land where ``--out`` says."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"{key} must be a folder name (a folder inside --out), got {name!r}")


@dataclass
class OneStageConfig:
    """D-SSAD (+ GCM): clips of the snippet features of the dataset the preprocessing read."""

    model: DSSADConfig = field(default_factory=DSSADConfig)
    train: TrainConfig = field(default_factory=default_recipe)


# The settings of TrainStageConfig (dotted keys) that a run of each kind does not read: given, they
# are refused (they would change nothing); stored (a run's config.yaml, a checkpoint), they are
# dropped when read back (:func:`stage_settings`), so that a change of their defaults leaves older
# runs readable. Training samples units by the roles preprocessing gave them (PreprocessConfig's
# sampling thresholds); D-SSAD matches anchors, with neither unit sampling nor SSN's loss weights.
ROLE_THRESHOLDS = ("fg_iou", "incomplete_iou", "incomplete_overlap", "bg_iou", "bg_coverage")
UNREAD_BY = {"two-stage": ("one_stage", *(f"train.sampling.{name}" for name in ROLE_THRESHOLDS)),
             "one-stage": ("train", "model", "graph", "stream_lr", "one_stage.train.sampling", "one_stage.train.loss",
                           "inference.proposal_score")}   # D-SSAD has no proposals


@dataclass
class TrainStageConfig:
    data: str = "runs/preprocessed"
    # one-stage runs only: read this dataset (card, data root) directly instead of the preprocessed
    # folder ``data``; D-SSAD reads snippet features and needs no proposals, so no preprocessing
    card: str | None = None
    data_root: str | None = None
    # with ``card``: leave out the videos whose annotation or features fail their checks (listed in
    # the run's skipped_videos.json), as gcm preprocess --skip-bad does for a preprocessed ``data``
    skip_bad: bool = False
    out: str = "runs/train"
    name: str = "ssn-gcm"
    kind: Literal["two-stage", "one-stage"] = "two-stage"   # one-stage: D-SSAD, see one_stage
    streams: tuple[str, ...] = ("rgb", "flow")
    # section 4.2; a mapping given replaces this one, and a stream it does not name trains at train.lr
    stream_lr: dict[str, float] = field(default_factory=lambda: {"rgb": 0.001, "flow": 0.01})
    model: ModelConfig = field(default_factory=ModelConfig)
    graph: GraphSpec = field(default_factory=GraphSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    # fusion None: the dataset card's stream_fusion, chosen when the run starts (with_card_fusion)
    inference: InferenceConfig = field(default_factory=lambda: InferenceConfig(fusion=None))
    one_stage: OneStageConfig = field(default_factory=OneStageConfig)
    evaluate: bool = True                # evaluate the final model on the test split
    evaluate_every: int = 0              # also every N epochs: the test mAP in that epoch's log line
    num_workers: int = 2
    use_gpu: bool | None = None
    cpus_per_worker: float = 0.5
    max_failures: int = 2
    resume: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, stream_lr="> 0", evaluate_every=">= 0", num_workers=">= 1", cpus_per_worker="> 0",
                     max_failures=">= 0")
        check_folder_name("name", self.name)
        _check_names("streams", self.streams)   # which exist, the dataset says (workflows.train.check_inputs)
        if self.inference.fusion is not None:
            stream_weights(self.streams, self.inference.weights())   # refuses weights of 0 in all
            check_fusion_streams(self.inference.weights(), self.streams, "this run")
        key, recipe = self.recipe
        if recipe.epochs < 1:  # TrainConfig allows 0 for gcm_core.engine.fit's untrained baselines
            raise ValueError(f"a run trains for {key}.epochs >= 1, got {recipe.epochs}")
        if recipe.batch_videos % self.num_workers:   # else the batch would shrink to a multiple unsaid
            multiple = -(-recipe.batch_videos // self.num_workers) * self.num_workers
            raise ValueError(f"the {self.num_workers} workers split each batch evenly: {key}.batch_videos "
                             f"({recipe.batch_videos}) must be a multiple of num_workers, e.g. {multiple}")
        if self.kind == "one-stage":   # a two-stage run is checked where it starts (refuse_unread)
            self.refuse_unread()

    def refuse_unread(self) -> None:
        """Refuse the settings given that this kind of run does not read (:data:`UNREAD_BY`), naming
        where they belong. A two-stage run is checked where it starts (workflows.train.absolute_inputs),
        not when its config is made: a grid's base may make an experiment's trials one-stage after
        the experiment's base gave their one_stage settings."""
        unread = [key for key in UNREAD_BY[self.kind] if value_at(self, key) != _default_at(key)]
        if not unread:
            return
        listed = f"{' and '.join(unread)} {'are' if len(unread) > 1 else 'is'} not read by a {self.kind} run"
        if self.kind == "one-stage":
            raise ValueError(f"{listed}, changed here for nothing: it reads one_stage.train (less its sampling "
                             "and loss: D-SSAD matches anchors) and one_stage.model (its graph: "
                             "one_stage.model.graph), e.g. one_stage.train.epochs, not train.epochs")
        where = []
        if "one_stage" in unread:
            where.append("one_stage holds D-SSAD's settings: add kind=one-stage to train D-SSAD")
        if any(key.startswith("train.sampling.") for key in unread):
            where.append("a unit's role is given when preprocessing labels the units: gcm preprocess --set "
                         "sampling.fg_iou=...")
        raise ValueError(f"{listed}, changed here for nothing: {'; '.join(where)}")

    @property
    def recipe(self) -> tuple[str, TrainConfig]:
        """The training recipe this kind of run reads, with the key its settings go under."""
        return ("one_stage.train", self.one_stage.train) if self.kind == "one-stage" else ("train", self.train)


@dataclass
class EvaluateConfig:
    checkpoints: tuple[str, ...] = ()
    data: tuple[str, ...] = ()           # preprocessed datasets (their test split is evaluated)
    cards: tuple[str, ...] = ()          # datasets read directly (D-SSAD checkpoints only): cards ...
    data_roots: tuple[str, ...] = ()     # ... and their data roots, in the same order (none: $GCM_DATA_ROOT)
    out: str = "runs/evaluation"
    protocol: str | None = None          # default: each dataset card's protocol
    tiou: tuple[float, ...] | None = None
    overwrite: bool = False              # replace a previous evaluation in ``out``
    # datasets read directly (cards): leave out the test videos whose features fail their checks
    # (listed in ``out``/skipped_videos.json), as gcm train --skip-bad does
    skip_bad: bool = False
    # external video-level class scores (.json in BSN's layout, or UntrimmedNet's THUMOS'14 .npy):
    # every test video's detections are of its video_top best classes (the paper's "with video labels")
    video_scores: str | None = None
    video_top: int = 2
    use_gpu: bool | None = None          # None: when the cluster has GPUs
    gpus_per_pair: float = 0.25          # with GPUs: each evaluation's share of one (inference is light)
    # no number of workers: every (checkpoint, dataset) pair is a Ray task of one CPU (and, with
    # GPUs, gpus_per_pair), as many at once as the cluster holds
    # settings of InferenceConfig that replace each checkpoint's own (e.g. {nms: soft-nms, top_k: 100}):
    # post-processing tried on trained weights without training again
    inference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ranges(self, tiou="in (0, 1]", gpus_per_pair="in (0, 1]", video_top=">= 1")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if self.tiou is not None and not self.tiou:
            raise ValueError("tiou must give one or more thresholds (or none at all: each dataset's own)")
        overridden(InferenceConfig(), self.inference)   # an unknown key or a value out of range, named now


@dataclass
class TuneStageConfig:
    grid: str = ""
    data: str = "runs/preprocessed"
    out: str = "runs/tune"
    base: TrainStageConfig = field(default_factory=TrainStageConfig)
    cpus_per_trial: float = 0.1         # the trial's own process; its TorchTrainer workers ask for theirs
    gpus_per_trial: float = 0.0
    max_concurrent: int = 2
    # each setting trained with this many seeds (the recipe's seed, then +1, ...): the table gives
    # their mean and standard deviation, as a single run can move by the size of an ablation's effect
    seeds: int = 1
    resume: bool = False

    def __post_init__(self) -> None:   # Ray Tune wants a non-zero CPU for a trial's own process
        check_ranges(self, cpus_per_trial="> 0", gpus_per_trial=">= 0", max_concurrent=">= 1", seeds=">= 1")
        # what the experiment sets for every trial itself (the data: as it records it, or unset)
        owned = {"data": ("the trials train on the experiment's data (--data)", (self.data, TrainStageConfig.data)),
                 "name": ("each trial is named by its grid values", (TrainStageConfig.name,)),
                 "evaluate": ("every trial is evaluated, for the table", (True,)),
                 "resume": ("an interrupted experiment resumes with --resume", (False,))}
        given = [f"base.{key}: {why}" for key, (why, allowed) in owned.items()
                 if getattr(self.base, key) not in allowed]
        if given:
            raise ValueError(f"{'; '.join(given)} (the experiment sets it for every trial: changed here for nothing)")


# what each stage's output folder holds, by the stage config its config.yaml was written from
OUTPUTS: dict[type, str] = {PreprocessConfig: "a preprocessed dataset", TrainStageConfig: "a training run",
                            TuneStageConfig: "a grid experiment", EvaluateConfig: "an evaluation"}


def written_by(path: Path) -> type | None:
    """The stage config a config.yaml was written from: the stage whose own settings (those no
    other stage has) it names most of; None if that is not clear."""
    try:
        keys = set(read_yaml(path) or {})
    except (ValueError, TypeError):
        return None
    own = {stage: {f.name for f in dataclasses.fields(stage)} for stage in OUTPUTS}
    score = {stage: len(keys & names.difference(*(o for s, o in own.items() if s is not stage)))
             for stage, names in own.items()}
    best = sorted(score.values())
    return max(score, key=score.get) if best[-1] > best[-2] else None


def check_output_folder(folder: str | Path, stage: type) -> None:
    """Refuse to write ``stage``'s outputs into a folder holding another stage's: its config.yaml
    says how they were made (a run resumes from it, preprocessing restarts against it, a report
    reads it) and would be replaced, e.g. by an evaluation given a run's folder as --out."""
    path = Path(folder) / "config.yaml"
    other = written_by(path) if path.is_file() else None
    if other is not None and other is not stage:
        raise FileExistsError(f"{folder} holds {OUTPUTS[other]}; writing {OUTPUTS[stage]} there would replace its "
                              "config.yaml: give it a folder of its own")


def check_fusion_streams(fusion: dict[str, float], streams: list[str] | tuple[str, ...], whose: str) -> None:
    """Refuse fusion weights of streams that are neither ``whose``'s (a run's, a checkpoint's) nor
    the paper's (rgb, flow: one fusion may serve a grid or an evaluation of one-stream and
    two-stream models): a stream misspelt (``Flow``) would be left out unsaid, its stream
    weighing 1."""
    known = list(dict.fromkeys([*streams, *dict(InferenceConfig().fusion)]))
    unknown = sorted(set(fusion) - set(known))
    if unknown:
        raise ValueError(f"inference.fusion weighs {unknown}, which are not streams of {whose} ({list(streams)}) "
                         f"or the paper's")


def with_card_fusion(stage: TrainStageConfig, card: DatasetCard) -> TrainStageConfig:
    """The stage with its streams' late-fusion weights chosen: those it was given, else its dataset
    card's ``stream_fusion`` (a stream neither names weighs 1), written into its config and
    checkpoints so that every later evaluation fuses as the run did."""
    if stage.inference.fusion is not None:
        return stage
    fusion = tuple((s, w) for s, w in card.stream_fusion.items() if s in stage.streams)
    return dataclasses.replace(stage, inference=dataclasses.replace(stage.inference, fusion=fusion))


def overridden(settings: InferenceConfig, overrides: dict[str, Any]) -> InferenceConfig:
    """A checkpoint's inference ``settings`` with ``overrides`` (what ``gcm evaluate`` or ``gcm
    detect`` was given as ``inference``) in their place, checked as a config file's would be."""
    return from_dict(InferenceConfig, {**to_dict(settings), **overrides}, "inference")


def _default_at(key: str) -> Any:
    """The default of the TrainStageConfig setting at dotted ``key``."""
    head, _, rest = key.partition(".")
    return value_at(TrainStageConfig.__dataclass_fields__[head].default_factory(), rest)


def stage_settings(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored settings (its config.yaml, a checkpoint's) without those its kind does not
    read (:data:`UNREAD_BY`): written with the defaults of their day, they would be refused as
    given for nothing once those defaults change."""
    return functools.reduce(without_key, UNREAD_BY.get(stored.get("kind", TrainStageConfig.kind), ()), stored)


def sets_lr_alone(settings: dict[str, Any]) -> bool:
    """Whether a training stage's settings give ``train.lr`` without ``stream_lr``.

    Such a rate is meant for every stream: the default ``stream_lr`` (the paper's rgb 0.001 and
    flow 0.01) gives each stream its own rate and would override it unseen. A configuration naming
    both (as every resolved ``config.yaml`` does) is taken as it is."""
    return "lr" in (settings.get("train") or {}) and "stream_lr" not in settings


def resolve(cls: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None,
            earlier: dict[str, Any] | None = None, **explicit: Any) -> T:
    """Defaults (or ``earlier``: the settings of a run being resumed), then the YAML file, then
    ``--set`` overrides, then explicit CLI arguments (a ``train.lr`` given alone trains every
    stream at that rate: :func:`sets_lr_alone`)."""
    data: dict[str, Any] = dict(earlier or {})
    if yaml_path:
        path = Path(yaml_path)
        try:
            loaded = read_yaml(path) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the configuration ({err})") from None
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the configuration must be a mapping")
        data = deep_merge(data, loaded)
    data = deep_merge(data, parse_overrides(overrides or []))
    data = deep_merge(data, {k: v for k, v in explicit.items() if v is not None})
    if cls is TrainStageConfig and sets_lr_alone(data):
        data["stream_lr"] = {}
    if cls is TuneStageConfig and isinstance(data.get("base"), dict) and sets_lr_alone(data["base"]):
        data["base"] = {**data["base"], "stream_lr": {}}
    return from_dict(cls, data)


def earlier_settings(folder: Path, cls: type) -> dict[str, Any] | None:
    """The settings (of stage ``cls``) a run or experiment in ``folder`` was started with (its
    ``config.yaml``; None before a first start): what ``--resume`` continues with, changed only
    where the command says so, so that resuming needs the folder alone (less the sections its kind
    does not read: :func:`stage_settings`). Resolved from the defaults instead, a run started with
    ``train.epochs=2`` and resumed bare trained to the default 45 epochs unsaid."""
    written = folder / "config.yaml"
    if not written.is_file():
        return None
    try:
        settings = read_yaml(written)
        if not isinstance(settings, dict):
            raise ValueError("not a mapping")
        if cls is TrainStageConfig:
            settings = stage_settings(settings)
        elif cls is TuneStageConfig and isinstance(settings.get("base"), dict):
            settings = {**settings, "base": stage_settings(settings["base"])}
        from_dict(cls, settings)   # named here, not as a fault of the command's own settings
    except ValueError as err:
        raise ConfigError(f"{written}: cannot read the settings it was started with ({err})") from None
    return settings
