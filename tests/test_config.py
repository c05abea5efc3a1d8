"""The typed config tree: method.md defaults, presets, overrides, YAML round trip, validation, CLI."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml

from dagman import config as C
from dagman.cli import main as cli_main
from dagman.config import (
    METHOD_PRESETS,
    METHODS,
    SIZE_PRESETS,
    SIZES,
    Config,
    from_dict,
    load_config,
    parse_override,
    plan_steps,
    to_dict,
    to_yaml,
)
from dagman.errors import ConfigError


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------- defaults


def test_paper_dagman_carries_every_method_default():
    cfg = load_config("paper", "dagman")
    assert (cfg.size, cfg.method) == ("paper", "dagman")
    assert cfg == Config(), "the dataclass defaults are paper x dagman"
    m = cfg.model
    assert m.in_chans == 1 and m.embed_dim == 48
    assert m.patch_size == (2, 2, 2) and m.window_size == (4, 4, 4)
    assert m.depths == (2, 2, 8, 2) and m.num_heads == (4, 4, 8, 16)
    assert m.mlp_ratio == 4.0 and m.qkv_bias is True and m.downsample == "merging"
    assert m.drop_path_rate == 0.1 and cfg.ema.teacher_drop_path_rate == 0.0
    assert [C.stage_width(m, i) for i in range(5)] == [48, 96, 192, 384, 768]
    assert C.token_size(m, 3) == (16, 16, 16)
    sa = cfg.sa
    assert sa.enabled and sa.stage == 3 and sa.num_blocks == 2 and sa.num_heads == 8
    assert sa.mlp_ratio == 4.0 and sa.layerscale_init == 1e-4
    assert C.stage_width(m, sa.stage) == 384
    d = cfg.data
    assert d.spacing_mm == 2.0 and d.hu_window == (-750.0, 1750.0) and d.crop_size == 128
    assert (d.crop_size // 16) ** 3 == 512  # stage-3 tokens of a 128^3 crop
    k = cfg.mask
    assert k.student == "attention_hint" and k.ratio == 0.7 and k.hint_fraction == 0.1
    assert k.teacher_drop_ratio == 0.7 and k.unit_stage == 3 and k.attention_view == "dropped"
    h = cfg.heads
    assert h.num_prototypes == 8192 and h.hidden_dim == 2048 and h.bottleneck_dim == 256 and h.num_layers == 3
    assert h.separate_patch_last_layer and h.share_image_last_layer
    L = cfg.loss
    assert L.amip and L.ampd and L.aitd and L.gitd
    assert (L.amip_weight, L.ampd_weight, L.aitd_weight, L.gitd_weight) == (1.0, 0.1, 0.1, 0.1)
    assert L.student_temp == 0.1
    assert (L.teacher_temp_start, L.teacher_temp_end, L.teacher_temp_warmup_epochs) == (0.04, 0.07, 30)
    assert (L.patch_teacher_temp_start, L.patch_teacher_temp_end, L.patch_teacher_temp_hold_epochs) == (0.04, 0.07, 30)
    assert L.center_momentum == 0.9 and L.global_token_stage == 4
    o = cfg.optim
    assert o.optimizer == "adamw" and o.lr == 8e-4 and o.lr_reference_batch == 8 and o.scale_lr
    assert o.min_lr == 1e-6 and o.schedule == "cosine" and o.warmup_epochs == 80
    assert (o.weight_decay, o.weight_decay_end) == (0.04, 0.4)
    assert o.grad_clip == 0.3 and o.freeze_last_layer_epochs == 1 and o.betas == (0.9, 0.999)
    assert (cfg.ema.momentum_start, cfg.ema.momentum_end) == (0.996, 1.0)
    assert cfg.train.epochs == 800 and cfg.train.precision == "bf16"
    assert cfg.train.steps_per_epoch is None and cfg.train.total_steps is None


def test_every_field_is_annotated_and_documented():
    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name in hints
            help_text = f.metadata.get("help", "")
            assert help_text and "\n" not in help_text, f"{cls.__name__}.{f.name} lacks a one-line help"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(Config)
    assert len(C.config_keys()) > 90


def test_model_section_is_monai_swin_kwargs_and_builds():
    import inspect

    import torch
    from monai.networks.nets.swin_unetr import SwinTransformer

    accepted = set(inspect.signature(SwinTransformer.__init__).parameters)
    for size in SIZES:
        cfg = load_config(size)
        assert set(dataclasses.asdict(cfg.model)) <= accepted
        SwinTransformer(spatial_dims=3, **dataclasses.asdict(cfg.model))
    tiny = load_config("tiny")
    net = SwinTransformer(spatial_dims=3, **dataclasses.asdict(tiny.model))
    with torch.no_grad():
        outs = net(torch.zeros(1, 1, *(tiny.data.crop_size,) * 3))
    assert [tuple(o.shape[1:]) for o in outs] == [(12 * 2**i, *(32 // 2**i,) * 3) for i in range(5)]
    assert outs[tiny.sa.stage].shape[1] == C.stage_width(tiny.model, tiny.sa.stage) == 96


# ---------------------------------------------------------------------------------------------- presets

# method -> (student mask, teacher drop, SA on, {loss: weight} of the enabled losses)
METHOD_TABLE = {
    "dagman": ("attention_hint", 0.7, True, {"amip": 1.0, "ampd": 0.1, "aitd": 0.1, "gitd": 0.1}),
    "dagman-no-nt": ("attention_hint", 0.0, True, {"amip": 1.0, "ampd": 0.1, "aitd": 0.1, "gitd": 0.1}),
    "dagman-no-sa": ("random", 0.7, False, {"amip": 1.0, "ampd": 0.1, "gitd": 0.1}),
    "smit": ("random", 0.0, False, {"amip": 1.0, "ampd": 0.1, "gitd": 0.1}),
    "ibot": ("blockwise", 0.0, False, {"ampd": 1.0, "gitd": 1.0}),
    "attmask": ("attention_hint", 0.0, True, {"ampd": 1.0, "aitd": 1.0}),
}


@pytest.mark.parametrize("method", METHODS)
def test_method_preset_distinguishing_settings(method):
    student, drop, sa, losses = METHOD_TABLE[method]
    cfg = load_config("paper", method)
    assert cfg.method == method
    assert cfg.mask.student == student
    assert cfg.mask.teacher_drop_ratio == drop
    assert cfg.sa.enabled is sa
    for name in ("amip", "ampd", "aitd", "gitd"):
        assert getattr(cfg.loss, name) is (name in losses), name
        if name in losses:
            assert getattr(cfg.loss, f"{name}_weight") == losses[name]
    # a method preset changes nothing outside masks / teacher noise / SA / losses
    base = to_dict(load_config("paper", "dagman"))
    mine = to_dict(cfg)
    for section in ("model", "data", "heads", "optim", "ema", "train"):
        assert mine[section] == base[section], section
    assert mine["mask"]["ratio"] == 0.7 and mine["mask"]["hint_fraction"] == 0.1


def test_size_and_method_axes_touch_disjoint_keys():
    def keys(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")
            else:
                yield prefix + k

    size_keys = {k for p in SIZE_PRESETS.values() for k in keys(p)}
    method_keys = {k for p in METHOD_PRESETS.values() for k in keys(p)}
    assert size_keys and method_keys and not size_keys & method_keys


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_every_size_method_combination_validates(size, method):
    cfg = load_config(size, method)
    assert (cfg.size, cfg.method) == (size, method)
    C.validate(cfg)
    assert cfg.mask.student == METHOD_TABLE[method][0]
    assert cfg.model == load_config(size, "dagman").model


def test_size_presets():
    tiny, small = load_config("tiny"), load_config("small")
    assert tiny.model.embed_dim == 12 and tiny.model.depths == (1, 1, 2, 1) and tiny.model.num_heads == (2, 2, 4, 8)
    assert tiny.data.crop_size == 64 and tiny.data.batch_size == 2 and tiny.data.num_workers <= 1
    assert (tiny.heads.num_prototypes, tiny.heads.hidden_dim, tiny.heads.bottleneck_dim) == (1024, 256, 64)
    assert tiny.train.epochs < 50 and tiny.train.precision == "fp32"
    assert small.model.embed_dim == 24 and small.model.depths == (2, 2, 2, 2) and small.data.crop_size == 96
    # schedules shrink with the run but keep their order of magnitude
    assert tiny.optim.warmup_epochs < tiny.train.epochs and small.optim.warmup_epochs < small.train.epochs


# -------------------------------------------------------------------------------------------- overrides


def test_overrides_are_typed():
    cfg = load_config(
        "tiny",
        "smit",
        overrides=[
            "optim.lr=1e-3",  # YAML reads 1e-3 as text; still a float
            "optim.min_lr=0",  # int accepted for float
            "model.depths=[2,2,2,2]",
            "mask.student=random",
            "loss.gitd=false",
            "train.total_steps=7",
            "data.cache=/tmp/my cache",
            "data.hu_window=[-1000, 1000]",
            "train.precision=bf16",
        ],
    )
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.min_lr == 0.0 and isinstance(cfg.optim.min_lr, float)
    assert cfg.model.depths == (2, 2, 2, 2) and isinstance(cfg.model.depths, tuple)
    assert cfg.mask.student == "random" and cfg.loss.gitd is False
    assert cfg.train.total_steps == 7 and cfg.data.cache == "/tmp/my cache"
    assert cfg.data.hu_window == (-1000.0, 1000.0) and cfg.train.precision == "bf16"
    assert load_config("tiny", overrides=["data.cache=x", "data.cache=null"]).data.cache is None
    # later overrides win
    assert load_config("tiny", overrides=["optim.lr=0.1", "optim.lr=0.2"]).optim.lr == 0.2


def test_parse_override():
    assert parse_override("optim.lr=1e-3") == ("optim.lr", "1e-3")  # converted by from_dict
    assert parse_override("model.depths=[1,1,2,1]") == ("model.depths", [1, 1, 2, 1])
    assert parse_override("data.cache=123") == ("data.cache", "123")  # text keys keep raw text
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


def test_yaml_file_is_partial_and_nested(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("optim:\n  lr: 2.0e-4\nmask:\n  ratio: 0.6\n")
    cfg = load_config("tiny", "dagman", file=f, overrides=["optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4  # overrides after the file
    assert cfg.mask.ratio == 0.6 and cfg.mask.hint_fraction == 0.1  # file keys only
    assert cfg.model.embed_dim == 12  # presets below the file
    # size / method named in a file choose the presets
    g = tmp_path / "pick.yaml"
    g.write_text("size: tiny\nmethod: ibot\n")
    picked = load_config(file=g)
    assert picked == load_config("tiny", "ibot")
    assert "conflicting method" in _error(method="smit", file=g)


# --------------------------------------------------------------------------------------------- YAML I/O


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("comments", [True, False])
def test_yaml_round_trip(tmp_path, method, comments):
    cfg = load_config("tiny", method, overrides=["optim.lr=0.00123", "data.cache=/data/ct cache", "train.seed=7"])
    text = to_yaml(cfg, comments=comments)
    parsed = yaml.safe_load(text)
    assert parsed == to_dict(cfg)
    assert parsed["method"] == method and parsed["size"] == "tiny"
    path = tmp_path / "config.yaml"
    C.save_config(cfg, path) if comments else path.write_text(text)
    assert load_config(file=path) == cfg
    assert from_dict(parsed) == cfg
    assert to_yaml(load_config(file=path), comments=comments) == text  # stable


def test_yaml_keys_in_declaration_order():
    text = to_yaml(load_config("paper"), comments=False)
    top = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert top == ["method", "size", "model", "sa", "data", "mask", "heads", "loss", "optim", "ema", "train"]


def test_config_is_frozen():
    cfg = load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_key_suggests_closest():
    assert _error(overrides=["optim.lrr=1e-3"]) == "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    assert "did you mean 'model.depths'" in _error(overrides=["modle.depths=[1,1,1,1]"])
    assert "did you mean 'train.seed'" in _error(overrides=["seed=3"])
    assert "is a section" in _error(overrides=["optim=3"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  warmup: 3\n")
    message = _error(file=f)
    assert "'optim.warmup'" in message and str(f) in message and "optim.warmup_epochs" in message
    f.write_text("optim: [1, 2\n")
    assert "not valid YAML" in _error(file=f)
    f.write_text("- 1\n- 2\n")
    assert "mapping" in _error(file=f)
    assert "does not exist" in _error(file=tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=abc", "config key 'optim.lr' expects float, got 'abc'"),
        ("train.epochs=1.5", "config key 'train.epochs' expects int, got 1.5"),
        ("data.batch_size=true", "config key 'data.batch_size' expects int, got True"),
        ("loss.amip=1", "config key 'loss.amip' expects bool, got 1"),
        ("model.depths=[1,2]", "config key 'model.depths' expects a list of 4 ints, got [1, 2]"),
        ("model.window_size=4", "config key 'model.window_size' expects a list of 3 ints, got 4"),
        ("train.total_steps=x", "config key 'train.total_steps' expects int or null, got 'x'"),
    ],
)
def test_wrong_type(override, expected):
    assert _error(size="tiny", overrides=[override]) == expected


def test_bad_choice():
    message = _error(overrides=["mask.student=rand"])
    assert message.startswith("config key 'mask.student' must be one of attention_hint, attention_high")
    assert "did you mean 'random'" in message
    assert "one of 3, 4" in _error(overrides=["loss.global_token_stage=2"])
    assert "fp32, bf16, fp16" in _error(overrides=["train.precision=fp64"])


def test_unknown_size_or_method_lists_valid_ones():
    assert _error(size="huge") == "unknown size 'huge' (--size); valid: tiny, cpu, small, paper"
    message = _error(method="dino")
    assert all(m in message for m in METHODS)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.num_heads=[5,4,8,16]"], "model.num_heads[0]=5 must divide stage 1 width 48"),
        (["model.num_heads=[4,4,8,7]"], "model.num_heads[3]=7 must divide stage 4 width 384"),
        (["sa.num_heads=7"], "sa.num_heads=7 must divide the SA width 384"),
        (["sa.stage=4", "mask.unit_stage=4", "sa.num_heads=7"], "SA width 768"),
        (["data.crop_size=112"], "data.crop_size 112 must be divisible by 32"),
        (["model.patch_size=[4,4,4]", "data.crop_size=96"], "data.crop_size 96 must be divisible by 64"),
        (["mask.ratio=1.0"], "config key 'mask.ratio' must be in (0, 1)"),
        (["mask.ratio=0"], "config key 'mask.ratio' must be in (0, 1)"),
        (["mask.hint_fraction=0.8"], "mask.hint_fraction (s=0.8) must be in [0, mask.ratio=0.7]"),
        (["mask.teacher_drop_ratio=1"], "mask.teacher_drop_ratio"),
        (["sa.enabled=false"], "mask.student=attention_hint needs the SA block"),
        (["mask.student=random", "sa.enabled=false"], "loss.aitd needs the SA block"),
        (["sa.stage=2"], "mask.unit_stage=3 must equal sa.stage=2"),
        (["data.hu_window=[100, -100]"], "lo < hi"),
        (["optim.min_lr=0.01"], "optim.min_lr=0.01 must be in [0, optim.lr=0.0008]"),
        (["optim.warmup_epochs=900"], "must not exceed train.epochs=800"),
        (["ema.momentum_start=0.9999", "ema.momentum_end=0.99"], "ema.momentum_start"),
        (["loss.amip=false", "loss.ampd=false", "loss.aitd=false", "loss.gitd=false"], "at least one"),
        (["loss.ampd_weight=0"], "loss.ampd_weight' must be > 0"),
        (["mask.block_ratio_range=[0.5, 0.1]"], "mask.block_ratio_range"),
        (["data.slab_prob=1.5"], "data.slab_prob"),
        (["data.slab_fraction_range=[0, 0.5]"], "data.slab_fraction_range must satisfy 0 < lo <= hi <= 1"),
        (["data.slab_fraction_range=[0.5, 1.2]"], "data.slab_fraction_range must satisfy 0 < lo <= hi <= 1"),
        (["train.total_steps=0"], "train.total_steps' must be > 0"),
    ],
)
def test_cross_field_errors(overrides, fragment):
    assert fragment in _error(overrides=overrides)


def test_valid_non_default_combinations():
    # SA placement ablation at stage 2 with matching mask units; stage-4 SA; loss ablations
    assert load_config(overrides=["sa.stage=2", "mask.unit_stage=2"]).sa.stage == 2
    assert load_config(overrides=["sa.stage=4", "mask.unit_stage=4"]).sa.stage == 4
    assert not load_config(overrides=["loss.amip=false"]).loss.amip
    assert load_config("tiny", "attmask", overrides=["mask.student=attention_high"]).mask.student == "attention_high"
    assert load_config(overrides=["mask.hint_fraction=0"]).mask.hint_fraction == 0.0
    assert load_config(overrides=["loss.aitd=false", "loss.aitd_weight=0"]).loss.aitd_weight == 0.0


# ------------------------------------------------------------------------------------------ epochs/steps


def test_plan_steps():
    cfg = load_config("paper")
    plan = plan_steps(cfg, num_volumes=10_412, world_size=4)
    assert plan.global_batch == 8 and plan.peak_lr == pytest.approx(8e-4)
    assert plan.steps_per_epoch == 10_412 // 8 == 1301
    assert plan.total_steps == 800 * 1301 and plan.steps(80) == 80 * 1301
    one_gpu = plan_steps(cfg, num_volumes=100, world_size=1)
    assert one_gpu.peak_lr == pytest.approx(2e-4) and one_gpu.steps_per_epoch == 50
    # --steps compresses the whole schedule: warm-up keeps its 10 % share
    short = plan_steps(load_config("paper", overrides=["train.total_steps=400"]), num_volumes=3)
    assert short.total_steps == 400 and short.steps(80) == 40 and short.steps(1) == 0
    # explicit steps_per_epoch: epochs convert with it, total_steps still caps the run
    fixed = plan_steps(load_config("tiny", overrides=["train.steps_per_epoch=5", "train.total_steps=12"]), 1)
    assert fixed.steps_per_epoch == 5 and fixed.total_steps == 12 and fixed.steps(1) == 5
    assert plan_steps(load_config("tiny"), num_volumes=1).steps_per_epoch == 1  # fewer volumes than a batch
    assert plan_steps(load_config("tiny", overrides=["optim.scale_lr=false"]), 8, 4).peak_lr == 8e-4
    with pytest.raises(ConfigError, match="no volumes"):
        plan_steps(load_config("tiny"), num_volumes=0)


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_print_config_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "dagman", "pretrain", "--size", "tiny", "--method", "smit", "--print-config",
         "optim.lr=0.001"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    parsed = yaml.safe_load(proc.stdout)
    assert parsed["optim"]["lr"] == 0.001
    assert parsed["method"] == "smit" and parsed["size"] == "tiny" and parsed["mask"]["student"] == "random"


def test_cli_typo_is_one_line_exit_2_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "dagman", "pretrain", "--size", "tiny", "--print-config", "optim.lrr=0.001"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines == ["dagman: error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"]
    assert "Traceback" not in proc.stderr


def test_cli_options_map_to_keys(capsys, tmp_path):
    code = cli_main(
        ["pretrain", "--size", "tiny", "--method", "ibot", "--data", str(tmp_path), "--steps", "9", "--seed", "3",
         "--print-config"]
    )
    assert code == 0
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["data"]["cache"] == str(tmp_path)
    assert parsed["train"]["total_steps"] == 9 and parsed["train"]["seed"] == 3
    assert parsed["mask"]["student"] == "blockwise"


def test_cli_saved_config_reloads(capsys, tmp_path):
    assert cli_main(["pretrain", "--size", "tiny", "--method", "attmask", "--print-config", "mask.ratio=0.5"]) == 0
    path = tmp_path / "config.yaml"
    path.write_text(capsys.readouterr().out)
    assert cli_main(["pretrain", "--config", str(path), "--print-config"]) == 0
    again = yaml.safe_load(capsys.readouterr().out)
    assert again == to_dict(load_config("tiny", "attmask", overrides=["mask.ratio=0.5"]))


def test_cli_pretrain_without_out_or_data_is_a_one_line_error(capsys, tmp_path):
    assert cli_main(["pretrain", "--size", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "--out RUN" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["pretrain", "--size", "tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--data CACHE" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["pretrain", "--method", "nope", "--print-config"]) == 2
    assert "valid: dagman" in capsys.readouterr().err


def test_preset_module_default_weights_are_the_dataclass_defaults():
    """config_presets.DEFAULT_WEIGHTS (what a method preset keeps for the losses it turns off) cannot drift from
    LossConfig's defaults."""
    from dagman.config import LossConfig
    from dagman.config_presets import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS == {n: getattr(LossConfig(), f"{n}_weight") for n in ("amip", "ampd", "aitd", "gitd")}


def test_override_config_applies_overrides_on_a_saved_config():
    from dagman.config import load_config, override_config, to_dict

    saved = to_dict(load_config(size="cpu", method="dagman", overrides=["loss.koleo_head_weight=0.01"]))
    cfg = override_config(saved, ["mask.student=random", "mask.ratio=0.5"])
    assert (cfg.mask.student, cfg.mask.ratio, cfg.loss.koleo_head_weight) == ("random", 0.5, 0.01)
    assert override_config(saved) == load_config(size="cpu", method="dagman", overrides=["loss.koleo_head_weight=0.01"])
    with pytest.raises(ConfigError, match="no_such"):
        override_config(saved, ["mask.no_such=1"])
