"""Config: defaults, overrides, validation; every mistake names the key."""

import pytest

from tuner.config import Config, load_config, parse_overrides
from tuner.errors import UserError


def test_defaults_are_valid_and_size_fills_architecture():
    cfg = load_config()
    assert cfg.model.size == "tiny" and cfg.model.hidden == 32 and cfg.model.ffn == 128
    big = load_config(overrides=["model.size=430M"])
    assert (big.model.hidden, big.model.layers, big.model.heads) == (1024, 8, 16)


def test_overrides_are_typed():
    cfg = load_config(overrides=["optim.lr=3e-4", "train.batch_size=7", "model.tied_head=false",
                                 "train.checkpoint_dir=none", "model.hidden=48", "model.heads=4"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.batch_size == 7
    assert cfg.model.tied_head is False and cfg.train.checkpoint_dir is None and cfg.model.hidden == 48


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean optim.lr"),
    ("nosuch.key=1", "unknown config key"),
    ("optim.lr=-1", "optim.lr=-1.0 must be positive"),
    ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
    ("train.window_prob=1.5", "train.window_prob=1.5 must be in [0, 1]"),
    ("train.batch_size=abc", "train.batch_size='abc' is not a valid int"),
    ("model.size=999M", "model.size='999M' is not one of: tiny, bert4rec, 5M, 85M, 130M, 430M"),
    ("train.amp=fp8", "train.amp='fp8' is not one of"),
    ("train.weights=fp16", "train.weights='fp16' is not one of: auto, fp32, bf16"),
    ("optim.moments=fp8", "optim.moments='fp8' is not one of: fp32, bf16"),
    ("model.attention=flash", "model.attention='flash' is not one of: auto, efficient, cudnn, math, triton"),
    ("model.fused_add_norm=yes", "model.fused_add_norm='yes' is not one of: auto, on, off"),
    ("model.residual=fp16", "model.residual='fp16' is not one of: fp32, bf16, half"),
    ("optim.lr=nan", "not a valid float"),
    ("model.hidden=33", "divisible by model.heads"),
    ("noequals", "must look like section.key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=None) as info:
        load_config(overrides=[override])
    assert message in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (["train.weights=bf16", "train.amp=fp16"], "train.weights=bf16 needs bf16 autocast, not train.amp=fp16"),
    (["train.weights=bf16", "optim.ema_decay=0.9"], "cannot be combined with optim.ema_decay"),
    (["train.weights=fp32", "optim.moments=bf16"], "optim.moments=bf16 needs bf16 weights"),
    (["train.batch_scope=global", "resources.workers=3", "train.batch_size=32"],
     "train.batch_size=32 with train.batch_scope=global must be a multiple of resources.workers=3"),
    (["train.batch_scope=all"], "train.batch_scope='all' is not one of: worker, global"),
])
def test_settings_that_cannot_work_together_are_refused(overrides, message):
    with pytest.raises(UserError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_yaml_unknown_section_and_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown key.*optim.learning_rate.*valid: optim.lr"):
        load_config(str(bad))
    bad.write_text("optimizer: {}\n")
    with pytest.raises(UserError, match="unknown config section"):
        load_config(str(bad))
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))


def test_flat_keys_round_trip():
    cfg = Config()
    flat = cfg.flat()
    assert flat["optim.lr"] == cfg.optim.lr and "tracking.experiment" in flat
    assert set(parse_overrides(["optim.lr=1"])) == {"optim"}


def test_relative_local_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    from tuner.train.driver import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["data.path=data/ml.txt", "train.init_from=models:/bert4rec-tiny/1"])
    absolute_paths(cfg)
    assert cfg.data.path == str(tmp_path / "data" / "ml.txt")
    assert cfg.train.init_from == "models:/bert4rec-tiny/1"  # URIs are left alone


@pytest.mark.parametrize("overrides, fused", [
    ([], False),  # plain compile: each kernel call's host time would cost more than it saves
    (["train.compile_mode=reduce-overhead"], True),  # CUDA graphs replay the kernels without host work
    (["train.compile_mode=reduce-overhead", "train.compile=off"], False),
    (["model.fused_add_norm=on"], True),
    (["train.compile_mode=max-autotune", "model.fused_add_norm=off"], False),
])
def test_fused_add_norm_follows_cuda_graphs_unless_set(overrides, fused):
    from tuner.model.build import model_config

    assert model_config(load_config(overrides=overrides), 100).fused_add_norm is fused
