"""CLI and YAML parsing into the typed config: conversion, precedence, and errors that name the field."""
from pathlib import Path

import pytest
import yaml

from harmony.cli import config_from_dict, format_help, parse_args
from harmony.config import config_to_dict, dump_yaml
from harmony.config import Config, ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate():
    cfg, name = parse_args([], default_config=None)
    assert name == "default" and cfg == Config()


def test_no_config_reads_configs_default_yaml(tmp_path):
    """A bare ``train.py`` runs configs/default.yaml (run folder name ``default``); --config replaces it. One meaning
    of "default": every value the file sets is the dataclass default, so no file, the file and a user's own YAML
    that sets nothing all run the same job."""
    from harmony.cli import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == CONFIGS / "default.yaml"
    cfg, name = parse_args([])
    assert name == "default"
    written = yaml.safe_load(DEFAULT_CONFIG.read_text())
    checked = 0
    for section, values in written.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
            checked += 1
    print(f"{checked} values of default.yaml checked")
    assert cfg == Config() and checked >= 40
    for section, values in written.items():  # each value is the field's own default, not only the parsed result
        for key, value in values.items():
            assert getattr(getattr(Config(), section), key) == value, f"{section}.{key}"
    empty = tmp_path / "empty.yaml"
    empty.write_text("train: {}\n")
    assert parse_args(["--config", str(empty)])[0] == cfg
    cfg, _ = parse_args(["--train.steps=5"])  # overrides still apply on top of the file
    assert cfg.train.steps == 5 and cfg.data.noise == written["data"]["noise"]
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"train": {"steps": 3}}))
    cfg, name = parse_args(["--config", str(other)])  # an explicit --config replaces default.yaml
    assert name == "other" and cfg.train.steps == 3 and cfg.data == Config().data
    with pytest.warns(UserWarning, match="built-in defaults"):
        cfg, name = parse_args([], default_config=tmp_path / "missing.yaml")
    assert name == "default" and cfg == Config()


def test_type_conversion_of_overrides():
    cfg, _ = parse_args(["--train.steps=7", "--train.lr=3e-4", "--log.progress=off", "--eval.probe", "no",
                         "--model.video_patch=[4,16,16]", "--harmony.lam=0.5", "--data.manifest=a b.jsonl",
                         "--harmony.scope=last_block", "--harmony.renormalize=True"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.log.progress is False and cfg.eval.probe is False and cfg.harmony.renormalize is True
    assert cfg.model.video_patch == [4, 16, 16]
    assert cfg.harmony.lam == 0.5 and cfg.data.manifest == "a b.jsonl" and cfg.harmony.scope == "last_block"
    cfg, _ = parse_args(["--model.video_patch=1,2,3", "--train.weight_decay=0"])
    assert cfg.model.video_patch == [1, 2, 3] and cfg.train.weight_decay == 0.0


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "exp1.yaml"
    f.write_text(yaml.safe_dump({"train": {"steps": 11, "lr": 0.002}, "data": {"noise": 0.4}}))
    cfg, name = parse_args(["--config", str(f), "--train.steps=12"])
    assert name == "exp1"
    assert cfg.train.steps == 12 and cfg.train.lr == 0.002 and cfg.data.noise == 0.4
    cfg, _ = parse_args([f"--config={f}"])
    assert cfg.train.steps == 11


@pytest.mark.parametrize("args,words", [
    (["--trian.steps=3"], ["trian", "train", "model", "profile"]),
    (["--train.stepz=3"], ["train.stepz", "steps", "batch_size"]),
    (["--train.precision=fp16"], ["train.precision", "fp32", "bf16"]),
    (["--harmony.realign=pcgrd"], ["harmony.realign", "pcgrad", "gradvac"]),
    (["--train.parallel=zero"], ["train.parallel", "ddp", "fsdp"]),
    (["--train.steps=0"], ["train.steps", ">= 1"]),
    (["--data.noise=1.5"], ["data.noise", "<= 1"]),
    (["--train.steps=abc"], ["train.steps", "integer"]),
    (["--train.lr=fast"], ["train.lr", "number"]),
    (["--log.progress=maybe"], ["log.progress", "true"]),
    (["--profile.nsys=5"], ["profile.nsys", "start:stop"]),
    (["--profile.torch=9:3"], ["profile.torch", "start < stop"]),
    (["steps=3"], ["unexpected argument"]),
    (["--train.steps"], ["train.steps", "needs a value"]),
])
def test_errors_name_the_field_and_allowed_values(args, words):
    with pytest.raises(ConfigError) as err:
        parse_args(args)
    msg = str(err.value)
    print(msg)
    for w in words:
        assert w in msg


def test_yaml_errors(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"optim": {"lr": 1}}))
    with pytest.raises(ConfigError, match="unknown config section 'optim'.*train"):
        parse_args(["--config", str(f)])
    f.write_text(yaml.safe_dump({"train": {"precision": "fp8"}}))
    with pytest.raises(ConfigError, match=r"train.precision='fp8'.*\['fp32', 'bf16'\]"):
        parse_args(["--config", str(f)])
    f.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(["--config", str(f)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_dict_round_trip():
    cfg, _ = parse_args(["--train.steps=9", "--model.video_patch=[1,4,4]", "--harmony.realign=gradvac"])
    back = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert back == cfg
    assert config_to_dict(cfg)["model"]["video_patch"] == [1, 4, 4]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg, name = parse_args(["--config", str(path)])
    assert name == path.stem
    print(path.name, cfg.train.steps, cfg.train.parallel, cfg.train.precision)


def test_shipped_gpu_configs_are_gpu_runs():
    for name in ("vatt_ma_small", "vatt_ma_medium"):
        cfg, _ = parse_args(["--config", str(CONFIGS / f"{name}.yaml")])
        assert cfg.train.precision == "bf16" and cfg.train.parallel == "fsdp" and cfg.train.device == "cuda"


def test_help_lists_every_section():
    text = format_help()
    for section in ("model", "data", "harmony", "train", "eval", "log", "profile"):
        assert f"[{section}]" in text
    assert "--train.batch_size" in text and "GLOBAL" in text


def test_main_rejects_bad_config_before_any_work(tmp_path, capsys):
    from harmony.trainer.loop import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main([f"--log.run_dir={run_dir}", "--train.precision=fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    print(err)
    assert "train.precision" in err and "bf16" in err
    assert not run_dir.exists()


def test_curriculum_parts_one_check_over_every_combination():
    """The curriculum is a score source × a rule × a target (× the per-item memory): every combination is either
    accepted or refused with a message naming the part, and the refused ones are exactly these (written out here,
    not read from the code): a threshold or soft rule on a score with no fixed scale (gvt, loss, combo), and the
    per-item memory with the per-pair target."""
    import itertools

    unscaled = {"gvt", "loss", "combo"}
    refused = accepted = 0
    for score, rule, target, memory in itertools.product(
            ["cos", "gvt", "loss", "gmm", "combo", "agree", "loss_agree"], ["threshold", "ratio", "soft"],
            ["triplet", "vt", "pair"], [False, True]):
        args = [f"--harmony.curriculum_score={score}", f"--harmony.curriculum_target={target}"]
        args += [f"--harmony.curriculum={rule}"] + (["--harmony.score_memory=true"] if memory else [])
        bad_scale = score in unscaled and rule != "ratio"
        bad_target = memory and target == "pair"
        if bad_scale or bad_target:
            with pytest.raises(ConfigError, match="no fixed scale" if bad_scale else "one per item"):
                parse_args(args, default_config=None)
            refused += 1
        else:
            parse_args(args, default_config=None)
            accepted += 1
    assert (accepted, refused) == (126 - 51, 36 + 21 - 6)  # unscaled × 2 rules × 3 × 2, memory × pair, both


def test_score_memory_is_a_source_and_the_former_spelling_still_reads(tmp_path):
    """score_memory is a source: it needs a rule; configs written as curriculum=memory (+ memory_schedule) read as
    the composed form, on the command line and in YAML (saved run folders and checkpoints)."""
    with pytest.raises(ConfigError, match="needs a rule"):
        parse_args(["--harmony.curriculum=none", "--harmony.score_memory=true"], default_config=None)
    new, _ = parse_args(["--harmony.score_memory=true", "--harmony.curriculum=soft",
                         "--harmony.curriculum_target=vt"], default_config=None)
    old, _ = parse_args(["--harmony.curriculum=memory", "--harmony.memory_schedule=soft",
                         "--harmony.curriculum_target=vt"], default_config=None)
    assert old == new and new.harmony.score_memory and new.harmony.curriculum == "soft"
    plain_old, _ = parse_args(["--harmony.curriculum=memory", "--harmony.curriculum_target=vt"], default_config=None)
    assert plain_old.harmony.curriculum == "ratio" and plain_old.harmony.score_memory  # the former default rule
    saved = tmp_path / "saved.yaml"
    saved.write_text("harmony:\n  memory_schedule: threshold\n  curriculum: memory\n  curriculum_target: vt\n")
    cfg, _ = parse_args(["--config", str(saved)], default_config=None)
    assert cfg.harmony.score_memory and cfg.harmony.curriculum == "threshold"
    ignored, _ = parse_args(["--harmony.memory_schedule=soft"], default_config=None)  # it had no effect
    assert ignored == Config()
