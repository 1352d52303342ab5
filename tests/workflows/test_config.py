"""Stage configuration: defaults, YAML, --set overrides, and the shipped grids."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from gcm_core.data.cards import load_card
from gcm_core.engine import build_heads, make_optimizer
from gcm_core.postprocess import InferenceConfig
from workflows import GRID_DIR
from workflows.config import (
    OUTPUTS, EvaluateConfig, PreprocessConfig, TrainStageConfig, TuneStageConfig, check_output_folder, earlier_settings,
    resolve, stage_settings, with_card_fusion,
)
from workflows.settings import ConfigError, dump, from_dict
from workflows.train import absolute_inputs
from workflows.tune import Grid, load_grid, trial_config


def test_defaults_are_the_papers_settings():
    c = TrainStageConfig()
    assert (c.graph.theta_ctx, c.graph.theta_sur, c.model.num_layers, c.model.num_samples) == (0.7, 1.0, 2, 4)
    assert c.train.lr_step_epochs == 15 and c.train.lr_gamma == 0.1 and c.model.dropout == 0.8
    assert c.stream_lr == {"rgb": 0.001, "flow": 0.01} and dict(InferenceConfig().fusion) == {"rgb": 2.0, "flow": 3.0}
    assert load_card("thumos14").stream_fusion == {"rgb": 2.0, "flow": 3.0}   # a run's fusion: its card's
    assert c.train.loss.completeness == c.train.loss.regression == 0.5


def test_yaml_then_set_then_explicit_arguments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 0.5, epochs: 3}\ngraph: {edge_types: [contextual]}\nname: from-yaml\n")
    c = resolve(TrainStageConfig, path, ["train.lr=0.25", "graph.k_sur=5", "model.act_module=mlp"], name="explicit")
    assert c.train.lr == 0.25 and c.train.epochs == 3 and c.graph.k_sur == 5
    assert c.graph.edge_types == ("contextual",) and c.model.act_module == "mlp" and c.name == "explicit"
    assert c.train.momentum == 0.9  # untouched nested defaults stay
    assert from_dict(TrainStageConfig, __import__("yaml").safe_load(dump(c))) == c  # the saved config round-trips


@pytest.mark.parametrize("override,message", [
    (["train.learning_rate=1"], "unknown key"),
    (["model.act_module=transformer"], "act_module"),
    (["graph.edge_types=[contextual,temporal]"], "unknown edge types"),
    (["train.epochs=many"], "expected int"),
    (["lr"], "key=value"),
    (["lr=0.1"], r"did you mean train\.lr or one_stage\.train\.lr\?"),  # a key at the wrong level
    (["train.bogus=1"], r"known: \[.*'weight_decay'\]\)$"),           # no guess when there is none
    (["train.lr=1e-3x"], r"^train\.lr: expected a number, got '1e-3x'$"),
    (["graph.theta_ctx=[0.7]"], r"^graph\.theta_ctx: expected a number, got \[0\.7\]$"),
    (["train.epochs=true"], r"^train\.epochs: expected int, got True$"),   # a bool is an int to Python
    (["graph.k_sur=2.5"], r"^graph\.k_sur: expected int, got 2\.5$"),     # int | None: int's message
    (["train=3", "train.epochs=1"], r"^--set train\.epochs=1: train is given a value \(3\) and settings inside it$"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(TrainStageConfig, None, override)


@pytest.mark.parametrize("stage,override,message", [
    (TrainStageConfig, "train.lr=-0.01", r"^train: lr must be > 0, got -0\.01$"),
    (TrainStageConfig, "train.lr_step_epochs=0", r"^train: lr_step_epochs must be >= 1, got 0$"),
    (TrainStageConfig, "train.epochs=0", r"a run trains for train\.epochs >= 1"),
    (TrainStageConfig, "model.dropout=1", r"^model: dropout must be in \[0, 1\), got 1\.0$"),
    (TrainStageConfig, "graph.theta_ctx=1.5", r"^graph: theta_ctx must be in \[0, 1\], got 1\.5$"),
    (TrainStageConfig, "stream_lr={rgb: 0.001, flow: 0}", r"stream_lr must be > 0, got \{'rgb': 0\.001, 'flow': 0\.0\}"),
    (TrainStageConfig, "inference.nms_threshold=-0.1", r"^inference: nms_threshold must be in \[0, 1\]"),
    (TrainStageConfig, "inference.fusion={rgb: 0, flow: 0}", r"fusion weighs the streams \['rgb', 'flow'\] 0 in all"),
    (TrainStageConfig, "inference.fusion={rgb: 2, Flow: 3}",   # misspelt: Flow left out, flow weighing 1
     r"fusion weighs \['Flow'\], which are not streams of this run \(\['rgb', 'flow'\]\) or the paper's$"),
    (TrainStageConfig, "train.sampling.ratio=[0, 0, 0]", r"^train\.sampling: ratio must be three counts"),
    (TrainStageConfig, "num_workers=0", r"num_workers must be >= 1, got 0$"),
    (TrainStageConfig, "num_workers=3", r"the 3 workers split each batch evenly: train\.batch_videos \(32\) must be a "
                                        r"multiple of num_workers, e\.g\. 33$"),
    (TrainStageConfig, ["kind=one-stage", "num_workers=4"], r"one_stage\.train\.batch_videos \(2\) must be a multiple"),
    (TrainStageConfig, "one_stage.model.clip_snippets=100", r"^one_stage\.model: clip_snippets must be a multiple of 16"),
    (TrainStageConfig, "one_stage.model.gcm_scales=[3]", r"^one_stage\.model: gcm_scales \(3,\) outside 0\.\.2$"),
    (TrainStageConfig, "one_stage.model.gcm_scales=[0, 0]", r"^one_stage\.model: gcm_scales must name each scale once"),
    (TrainStageConfig, "one_stage.model.anchor_ratios=[]", r"^one_stage\.model: anchor_ratios must give at least one"),
    (TrainStageConfig, "one_stage.model.window_stride=600", r"window_stride must be <= clip_snippets \(512\)"),
    (TrainStageConfig, "streams=[rgb, rgb]", r"streams must name one or more streams, each once, got \['rgb', 'rgb'\]"),
    (TrainStageConfig, "streams=[]", r"streams must name one or more streams, each once, got \[\]$"),
    (TrainStageConfig, "name=../elsewhere", r"name must be a folder name \(a folder inside --out\), got '\.\./elsewhere'$"),
    (TrainStageConfig, "name=''", r"name must be a folder name \(a folder inside --out\), got ''$"),
    (PreprocessConfig, "videos_per_shard=0", r"videos_per_shard must be >= 1, got 0$"),
    (TuneStageConfig, "cpus_per_trial=0", r"cpus_per_trial must be > 0, got 0\.0$"),
    (TuneStageConfig, "seeds=0", r"seeds must be >= 1, got 0$"),
    (EvaluateConfig, "tiou=[0.5, 1.5]", r"tiou must be in \(0, 1\], got \(0\.5, 1\.5\)$"),
    (EvaluateConfig, "tiou=[]", r"tiou must give one or more thresholds"),
    (EvaluateConfig, "protocol=thumos", r"protocol must be one of \['thumos14', 'activitynet'\], got 'thumos'$"),
    (PreprocessConfig, "roles=[train, val]", r"roles must name one or more of \['train', 'test'\], each once"),
    (PreprocessConfig, "parts=[body, body]", r"parts must name one or more of \['body', 'extended', 'three_part'\]"),
    (PreprocessConfig, "parts=[three_part]", r"parts must hold body"),
    (PreprocessConfig, "reduce=median", r"reduce: 'median' is not one of \('max', 'mean'\)"),
])
def test_settings_out_of_range_are_refused_where_they_are_read(stage, override, message):
    """Before any Ray worker starts (torch would refuse a negative lr minutes later in a worker;
    a dropout of 1 or a clip that does not tile the coarsest map would run and give nonsense)."""
    with pytest.raises(ConfigError, match=message):
        resolve(stage, None, override if isinstance(override, list) else [override])


def test_fusion_weights_are_given_as_a_mapping_or_as_pairs():
    """As a card's stream_fusion is written ({rgb: 2, flow: 3}), or as a written config.yaml holds them."""
    expected = (("rgb", 1.0), ("flow", 4.0))
    assert resolve(TrainStageConfig, None, ["inference.fusion={rgb: 1, flow: 4}"]).inference.fusion == expected
    assert resolve(TrainStageConfig, None, ["inference.fusion=[[rgb, 1], [flow, 4]]"]).inference.fusion == expected
    # the paper's two streams may be weighed in a one-stream run (a grid over the streams shares one fusion)
    assert resolve(TrainStageConfig, None, ["streams=[flow]", "inference.fusion={rgb: 1, flow: 4}"]
                   ).inference.fusion == expected


def test_a_run_fuses_its_streams_as_its_dataset_card_says_unless_given_weights():
    """A card's stream_fusion (datasets/README) is the weights a run trained on its dataset fuses
    with; weights given to the run replace it."""
    card = dataclasses.replace(load_card("thumos14"), stream_fusion={"rgb": 1.0, "flow": 4.0})
    assert resolve(TrainStageConfig).inference.fusion is None   # not chosen until the dataset is known
    assert with_card_fusion(resolve(TrainStageConfig), card).inference.weights() == {"rgb": 1.0, "flow": 4.0}
    one_stream = resolve(TrainStageConfig, None, ["streams=[flow]"])
    assert with_card_fusion(one_stream, card).inference.weights() == {"flow": 4.0}
    given = resolve(TrainStageConfig, None, ["inference.fusion={rgb: 2, flow: 3}"])
    assert with_card_fusion(given, card).inference.weights() == {"rgb": 2.0, "flow": 3.0}
    with pytest.raises(ValueError, match="inference.fusion is not chosen"):
        resolve(TrainStageConfig).inference.weights()


def test_settings_a_run_does_not_read_are_refused():
    """D-SSAD trains with one_stage.train (less its unit sampling and SSN's loss weights): a
    train.epochs meant for it would be ignored; a one_stage setting without kind=one-stage would
    train SSN as if it were D-SSAD's; a role threshold given to training, not to preprocessing,
    would leave the units' roles as they were; a unit count given to preprocessing, likewise."""
    with pytest.raises(ValueError, match=r"^one_stage is not read by a two-stage run.*add kind=one-stage"):
        absolute_inputs(resolve(TrainStageConfig, None, ["one_stage.model.gcm_scales=[0, 1, 2]"]))
    with pytest.raises(ValueError, match=r"^train\.sampling\.fg_iou is not read by a two-stage run.*"
                                         r"gcm preprocess --set sampling\.fg_iou"):
        absolute_inputs(resolve(TrainStageConfig, None, ["train.sampling.fg_iou=0.5", "train.sampling.per_video=4"]))
    # where a run starts: an experiment's base may give one_stage settings that its grid makes one-stage
    tune = resolve(TuneStageConfig, None, ["base.one_stage.train.epochs=5"])
    grid = Grid("k", "one-stage", {"kind": "one-stage"}, {"one_stage.model.hidden": [32, 64]}, {}, ["fused/mAP@0.5"])
    assert [trial_config(tune.base, grid, t).one_stage.train.epochs for t in grid.trials()] == [5, 5]
    for given, named in ((["train.epochs=5"], "train is"), (["model.dropout=0.5", "graph.l_sem=4"], "model and graph are"),
                         (["stream_lr.rgb=0.5"], "stream_lr is"),   # D-SSAD trains at one_stage.train.lr
                         (["one_stage.train.loss.regression=2"], r"one_stage\.train\.loss is"),
                         (["one_stage.train.sampling.per_video=4"], r"one_stage\.train\.sampling is")):
        with pytest.raises(ConfigError, match=f"{named} not read by a one-stage run.*one_stage\\.train\\.epochs, not"):
            resolve(TrainStageConfig, None, ["kind=one-stage", *given])
    with pytest.raises(ConfigError, match=r"sampling\.per_video: how many units .* train\.sampling\.per_video=\.\.\."):
        resolve(PreprocessConfig, None, ["sampling.per_video=4"])
    run = resolve(TrainStageConfig, None, ["kind=one-stage", "one_stage.train.epochs=5"])
    assert run.one_stage.train.epochs == 5
    assert from_dict(TrainStageConfig, yaml.safe_load(dump(run))) == run   # its written config reads back
    # stored with other values (an older version's defaults), what a run does not read is dropped
    stored = from_dict(TrainStageConfig, stage_settings({"train": {"sampling": {"fg_iou": 0.5, "per_video": 4}}}))
    assert (stored.train.sampling.fg_iou, stored.train.sampling.per_video) == (0.7, 4)


def test_an_experiments_own_settings_are_refused_in_its_base():
    """What an experiment sets for every trial itself (its data, as it records it or unset, the
    trials' names, their evaluation, resuming) would be replaced unsaid: base.data by the
    experiment's own data, so that the trials could train on another dataset than the one named."""
    with pytest.raises(ConfigError, match=r"base\.data: the trials train on the experiment's data \(--data\) "
                                          r"\(the experiment sets it for every trial: changed here for nothing\)$"):
        resolve(TuneStageConfig, None, ["base.data=runs/other"])
    with pytest.raises(ConfigError, match=r"base\.name: each trial is named by its grid values; base\.evaluate: every "
                                          r"trial is evaluated, for the table; base\.resume: .* --resume"):
        resolve(TuneStageConfig, None, ["base.name=mine", "base.evaluate=false", "base.resume=true"])
    assert resolve(TuneStageConfig, None, ["data=runs/other", "base.data=runs/other"]).base.data == "runs/other"


def stream_rates(config: TrainStageConfig) -> dict[str, float]:
    """The learning rate each stream's head trains at, as the optimiser of a run is built."""
    heads = build_heads(config.model, list(config.streams), 8, 3)
    optimizer, _ = make_optimizer(heads, config.train, config.stream_lr)
    return {s: group["lr"] for s, group in zip(heads.keys(), optimizer.param_groups)}


def test_a_learning_rate_given_alone_trains_every_stream():
    """The paper's per-stream rates are the default; a train.lr given without stream_lr would
    otherwise change nothing (each stream has a rate of its own), in a run as in a grid."""
    assert stream_rates(resolve(TrainStageConfig)) == {"rgb": 0.001, "flow": 0.01}
    assert stream_rates(resolve(TrainStageConfig, None, ["train.lr=0.05"])) == {"rgb": 0.05, "flow": 0.05}
    assert stream_rates(resolve(TrainStageConfig, None, ["train.lr=0.05", "stream_lr.rgb=0.002"])) == \
        {"rgb": 0.002, "flow": 0.05}
    tune = resolve(TuneStageConfig, None, ["base.train.lr=0.05"])
    assert stream_rates(tune.base) == {"rgb": 0.05, "flow": 0.05}
    grid = Grid("lr", "Learning rate", {}, {"train.lr": [0.1, 0.02]}, {}, ["fused/mAP@0.5"])
    assert [stream_rates(trial_config(TrainStageConfig(), grid, t)) for t in grid.trials()] == \
        [{"rgb": 0.1, "flow": 0.1}, {"rgb": 0.02, "flow": 0.02}]
    written = resolve(TrainStageConfig, None, ["train.lr=0.05", "stream_lr={rgb: 0.003, flow: 0.03}"])
    assert stream_rates(from_dict(TrainStageConfig, yaml.safe_load(dump(written)))) == {"rgb": 0.003, "flow": 0.03}


def test_exponent_floats_are_numbers_in_every_yaml_read(tmp_path):
    """``1e-3`` is a string to PyYAML (YAML 1.1 wants a dot and a signed exponent) but a number to
    the people who write it: a learning rate given so trained at '1e-3' (an error deep in a check)."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {lr: 2E-3, weight_decay: 5e-4}\ngraph: {theta_ctx: 7e-1}\n")
    c = resolve(TrainStageConfig, config, ["stream_lr={rgb: 1e-3, flow: 1.5e-2}", "inference.nms_threshold=3.5e-1"])
    assert (c.train.lr, c.train.weight_decay, c.graph.theta_ctx) == (0.002, 0.0005, 0.7)
    assert c.stream_lr == {"rgb": 0.001, "flow": 0.015} and c.inference.nms_threshold == 0.35
    assert resolve(TrainStageConfig, None, ["train.lr=1e-3"]).train.lr == 0.001
    grid = tmp_path / "lr.yaml"
    grid.write_text("name: lr\ngrid:\n  train.lr: [1e-3, 1e-2]\nmetrics: [fused/mAP@0.5]\n")
    g = load_grid(grid)
    assert [trial_config(TrainStageConfig(), g, t).train.lr for t in g.trials()] == [0.001, 0.01]
    assert resolve(TrainStageConfig, None, ["name=1e3run"]).name == "1e3run"   # not a number: stays a name


@pytest.mark.parametrize("text, problem", [
    ("name: x\ngrid:\n  graph.l_sem: []\n", r"grid must give each setting it varies \(a dotted key\) a non-empty list"),
    ("name: x\ngrid:\n  graph.l_sem: [1, 2]\nlabels:\n  graph.l_sem: [one]\n",
     "labels of graph.l_sem must name each of the grid's values of graph.l_sem"),
    ("name: x\ngrid:\n  graph.l_sem: [1, 2]\nlabels:\n  graph.lsem: [one, two]\n",
     r"labels name graph.lsem, which the grid does not vary \(it varies graph.l_sem\)"),
    ("name: x\ngrid:\n  graph.l_sem: [1, 2, 1.0]\n", "graph.l_sem gives 1.0 twice: two trials would train the same"),
    ("name: x\ngrid:\n  graph.l_sem: [1, 2]\nlabels:\n  graph.l_sem: [a, a]\n",
     r"the trials \{'graph.l_sem': 1\} and \{'graph.l_sem': 2\} would share the folder trials/l_sem=a "),
    (f"name: x\ngrid:\n  graph.l_sem: [1, 2]\nlabels:\n  graph.l_sem: [{'a' * 120}1, {'a' * 120}2]\n",
     "the trials .* would share the folder trials/l_sem=a+ "),
    ("- name\n- grid\n", "a grid is a mapping with a name and a grid"),
    ("name: ../x\ngrid:\n  graph.l_sem: [1]\n", r"name must be a folder name \(a folder inside --out\), got '../x'"),
    ("name: x\ngrid: {graph.l_sem: [1,\n", r"not valid YAML \(expected the node content"),
])
def test_a_malformed_grid_is_named_in_one_line(tmp_path, text, problem):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}(, line 3)?: {problem}") as err:
        load_grid(path)
    assert "\n" not in str(err.value)


def test_preprocess_caps_can_be_loosened_for_grids():
    c = resolve(PreprocessConfig, None, ["caps.sur_k=12", "caps.min_ctx_tiou=0.4"])
    assert c.caps.sur_k == 12 and c.caps.min_ctx_tiou == 0.4


@pytest.mark.parametrize("grid", sorted(p.stem for p in GRID_DIR.glob("*.yaml")))
def test_every_shipped_grid_yields_valid_trials(grid):
    g = load_grid(grid)
    trials = g.trials()
    assert len(trials) >= 3
    configs = [trial_config(TrainStageConfig(), g, t) for t in trials]
    assert len({repr(c) for c in configs}) == len(trials)  # every trial is a different configuration


def test_a_stage_refuses_a_folder_holding_another_stages_outputs(tmp_path):
    """Its config.yaml would be replaced: an evaluation written into a run's folder left a run that
    neither resumes nor reports. Each stage's folder is told by the config.yaml it wrote (one-stage
    runs and grid bases included); a folder of its own kind, or without a config.yaml, is its to use."""
    written = {PreprocessConfig: PreprocessConfig(), TrainStageConfig: resolve(TrainStageConfig, None, ["kind=one-stage"]),
               TuneStageConfig: TuneStageConfig(grid="table9_edges"), EvaluateConfig: EvaluateConfig(checkpoints=("m.pt",))}
    for stage, config in written.items():
        folder = tmp_path / stage.__name__
        folder.mkdir()
        (folder / "config.yaml").write_text(dump(config))
        for other in OUTPUTS:
            if other is stage:
                check_output_folder(folder, other)
            else:
                with pytest.raises(FileExistsError, match=f"^{folder} holds {OUTPUTS[stage]}; writing {OUTPUTS[other]} "
                                                          "there would replace its config.yaml"):
                    check_output_folder(folder, other)
        assert (folder / "config.yaml").read_text() == dump(config)
    check_output_folder(tmp_path / "new", EvaluateConfig)


def test_a_resumed_runs_settings_that_cannot_be_read_are_named_by_their_file(tmp_path):
    assert earlier_settings(tmp_path, TrainStageConfig) is None   # no run yet: a first start
    written = tmp_path / "config.yaml"
    written.write_text("train: {epochs: 2}\n")
    assert earlier_settings(tmp_path, TrainStageConfig) == {"train": {"epochs": 2}}
    for text, problem in (("train: [epochs\n", ""), ("- a list\n", "not a mapping"),
                          ("train: {epohcs: 2}\n", "unknown key ['epohcs'] in train")):
        written.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(written))}: cannot read the settings it was started "
                                              rf"with \(.*{re.escape(problem)}"):
            earlier_settings(tmp_path, TrainStageConfig)
