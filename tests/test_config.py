"""The config dataclasses are the one source of the command line: each field is exactly one option
with the field's default and its registry's choices, and a --config file sets the same fields
(flags win over it). No model is loaded except in the one end-to-end case."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from softcache.chat import InputShape, TrainOn
from softcache.cli import main
from softcache.config import (CROSS_LOSSES, DTYPES, FUSED_LINEAR, RESUMABLE_CHANGES, STUDENT_DTYPES, TOKENIZER_MODES,
                              CacheConfig, EvalConfig, TrainConfig)
from softcache.demo import DemoConfig
from softcache.documents import LONG, PACKINGS
from softcache.errors import SoftcacheError
from softcache.kinds import DRAWS, TARGET_KINDS
from softcache.losses import DIVERGENCES, TAILS
from softcache.mixture import MIX_STOPS
from softcache.settings import load_settings, settings_of
from softcache.store import FORMATS
from softcache.store.encoding import ID_CODES, VALUE_CODES
from softcache.trackers import TRACKERS

CONFIGS = {"cache": CacheConfig, "train": TrainConfig, "eval": EvalConfig}
REGISTRIES = {
    ("cache", "format"): tuple(FORMATS), ("cache", "targets"): tuple(TARGET_KINDS), ("cache", "ids"): ID_CODES,
    ("cache", "values"): VALUE_CODES, ("cache", "dtype"): DTYPES, ("train", "loss"): DIVERGENCES,
    ("train", "tail"): TAILS, ("train", "fused_linear"): FUSED_LINEAR, ("train", "student_dtype"): STUDENT_DTYPES,
    ("cache", "input_shape"): ("auto", *InputShape), ("cache", "train_on"): ("auto", *TrainOn),
    ("cache", "packing"): ("auto", *PACKINGS), ("cache", "long"): ("auto", *LONG), ("train", "report_to"): TRACKERS,
    ("cache", "mix_stop"): tuple(MIX_STOPS), ("train", "tokenizers"): TOKENIZER_MODES,
    ("train", "cross_loss"): CROSS_LOSSES, ("cache", "draws"): DRAWS,
}
REQUIRED = {"cache": ["--teacher", "t", "--data", "d"], "train": ["--store", "s", "--student", "x"],
            "eval": ["--model", "m", "--store", "s"]}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def options(command: str) -> dict[str, click.Option]:
    """The options of ``softcache COMMAND`` built from its config, by name (--help and --config left out)."""
    cmd = main.commands[command]
    params = cmd.get_params(click.Context(cmd))
    return {p.name: p for p in params if p.name != "config_file" and "--help" not in p.opts}


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("command", CONFIGS)
def test_every_field_is_exactly_one_option_with_its_default(command):
    cls, built = CONFIGS[command], options(command)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert sorted(built) == sorted(fields)  # a field without an option, or an option without a field, fails here
    flags = [opt for p in main.commands[command].get_params(click.Context(main.commands[command]))
             for opt in (*p.opts, *p.secondary_opts)]
    assert len(flags) == len(set(flags))
    kinds = {spec.name: spec.value_type for spec in settings_of(cls)}
    for name, field in fields.items():
        option = built[name]
        if field.default is dataclasses.MISSING:
            assert option.required, name
            continue
        assert not option.required and option.default == field.default, name
        if kinds[name] is bool:
            assert option.is_flag and option.secondary_opts == (["--no-" + option.opts[0][2:]] if field.default else [])
        elif (command, name) not in REGISTRIES:
            assert option.type is {str: click.STRING, int: click.INT, float: click.FLOAT}[kinds[name]], name


def test_every_choice_list_is_its_registry():
    choices = {(command, name): tuple(option.type.choices) for command in CONFIGS
               for name, option in options(command).items() if isinstance(option.type, click.Choice)}
    assert choices == REGISTRIES


def test_the_demo_keeps_exactly_its_seven_flags():
    built = options("demo")
    assert sorted(built) == ["chat", "out", "progress", "seed", "steps", "targets", "teacher"]
    defaults = DemoConfig()
    assert all(option.default == getattr(defaults, name) for name, option in built.items())


def test_resumable_changes_come_from_the_fields():
    assert set(RESUMABLE_CHANGES) == {"out", "resume", "progress", "num_workers", "verify_shards", "eval_every",
                                      "checkpoint_every", "device", "chunk_tokens", "fused_linear", "report_to",
                                      "fsdp_cpu_offload", "merge_lora"}


@pytest.mark.parametrize("command", ["cache", "train", "eval", "demo"])
def test_help_lists_every_flag(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    for option in options(command).values():
        for flag in (*option.opts, *option.secondary_opts):
            assert flag in result.output, flag
    assert "--config FILE" in result.output


def test_the_cli_starts_without_torch():
    """The options are built when a command is used, so `softcache info` never imports torch."""
    code = ("import sys; from click.testing import CliRunner; from softcache.cli import main; "
            "CliRunner().invoke(main, ['--help']); CliRunner().invoke(main, ['info', '--help']); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.fixture
def captured(monkeypatch):
    """The config each job receives from the command line (the jobs themselves are not run)."""
    import softcache.cache_job
    import softcache.train_job

    seen = {}

    def capture(config):
        seen["config"] = config
        return SimpleNamespace(summary=lambda: "captured")

    monkeypatch.setattr(softcache.cache_job, "run_cache", capture)
    monkeypatch.setattr(softcache.train_job, "run_train", capture)
    return seen


def test_a_yaml_file_sets_fields_and_flags_win(tmp_path, captured):
    config = tmp_path / "cache.yaml"
    config.write_text("teacher: builtin:smollm2\ndata: builtin:python-docs\nout: runs/x\n"
                      "seq-len: 256\ntargets: topp\ntop_p: 0.8\ntemperature: 2e-1\n--k: 16\nprogress: false\n")
    result = run("cache", "--config", config, "--seq-len", 128, "--out", tmp_path / "flag")
    assert result.exit_code == 0, result.output
    got = captured["config"]
    assert isinstance(got, CacheConfig)
    assert (got.teacher, got.data, got.targets, got.top_p, got.k) == ("builtin:smollm2", "builtin:python-docs",
                                                                       "topp", 0.8, 16)
    assert got.temperature == 0.2  # YAML 1.1 reads 2e-1 as a string; the float field takes it
    assert got.seq_len == 128 and got.out == str(tmp_path / "flag") and got.progress is False
    assert got.format == "zarr" and got.samples == CacheConfig.samples  # neither in the file nor given: the field defaults


def test_a_json_file_sets_fields_and_flags_win(tmp_path, captured):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"store": "s", "student": "x", "out": "o", "lr": 0.01, "loss": "jsd", "tail": None,
                                  "resume": True, "verify_shards": False, "steps": 7}))
    result = run("train", "--config", config, "--lr", 0.02, "--verify-shards")
    assert result.exit_code == 0, result.output
    got = captured["config"]
    assert isinstance(got, TrainConfig)
    assert (got.store, got.student, got.out, got.loss, got.tail, got.resume, got.steps) == ("s", "x", "o", "jsd",
                                                                                           None, True, 7)
    assert got.lr == 0.02 and got.verify_shards is True


def test_a_file_with_some_required_settings_still_needs_the_others(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: t\n")
    result = run("cache", "--config", config, "--data", "d")
    assert result.exit_code == 2 and "Missing option '--out'" in result.output  # click's own usage error, as today


def test_load_settings_from_python(tmp_path):
    path = tmp_path / "eval.yml"
    path.write_text("model: runs/a/final\nstore: runs/held\njson: true\nmax-sequences: 4\n")
    settings = load_settings(EvalConfig, path)
    assert EvalConfig(**settings) == EvalConfig(model="runs/a/final", store="runs/held", as_json=True, max_sequences=4)


@pytest.mark.parametrize("name,text,message", [
    ("absent.yaml", None, "--config {path} does not exist"),
    ("bad.yaml", "k: [1, 2\n", "--config {path} is not valid YAML: "),
    ("bad.json", '{"k": 1,}', "--config {path} is not valid JSON: "),
    ("list.yaml", "- k\n- 8\n", "--config {path} must hold a mapping of settings to values, not a list"),
    ("typo.yaml", "seq_lenn: 64\n", "--config {path}: unknown setting 'seq_lenn'; did you mean 'seq_len'?"),
    ("type.yaml", "k: eight\n", "--config {path}: k must be an integer, got 'eight'"),
    ("float.json", '{"k": 8.5}', "--config {path}: k must be an integer, got 8.5"),
    ("bool.yaml", "progress: maybe\n", "--config {path}: progress must be true or false, got 'maybe'"),
    ("null.yaml", "teacher: null\n", "--config {path}: teacher must be a string, got None"),
    ("choice.yaml", "format: parquet\n", "--config {path}: --format must be one of zarr, arrow, got 'parquet'"),
    ("range.yaml", "k: 0\n", "--config {path}: --k must be at least 1, got 0"),
    ("finite.yaml", "temperature: .inf\n", "--config {path}: --temperature must be greater than 0 and finite, got inf"),
    ("twice.yaml", "seq_len: 8\nseq-len: 9\n", "--config {path}: --seq-len is set twice"),
    ("settings.toml", "k = 8\n", "--config {path}: give a .yaml, .yml or .json file, not .toml"),
    ("utf16.yaml", "k: 8\n".encode("utf-16"), "--config {path} is not UTF-8 text (byte 0 is 0xff)"),
])
def test_a_bad_config_file_gets_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    result = run("cache", "--config", path, "--teacher", "t", "--data", "d", "--out", tmp_path / "s")
    line = one_line_error(result)
    assert message.format(path=path) in line, line


FLOAT_OPTIONS = [(command, spec.flag) for command, cls in CONFIGS.items() for spec in settings_of(cls)
                 if spec.value_type is float]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("command,flag", FLOAT_OPTIONS, ids=[f"{c}{f}" for c, f in FLOAT_OPTIONS])
def test_every_float_option_refuses_non_finite_values(tmp_path, command, flag, value):
    result = run(command, *REQUIRED[command], "--out", tmp_path / "out", flag, value)
    line = one_line_error(result)
    assert line.startswith(f"error: {flag} must be ") and line.endswith(f" and finite, got {float(value)}"), line


def test_float_options_exist():
    assert ("train", "--lr") in FLOAT_OPTIONS and ("cache", "--top-p") in FLOAT_OPTIONS


def test_messages_say_the_range():
    def message(**change):
        with pytest.raises(SoftcacheError) as err:
            dataclasses.replace(TrainConfig(store="s", student="x", out="o"), **change).validate()
        return str(err.value)

    assert message(beta=1.0) == "--beta must be between 0 and 1 (exclusive), got 1.0"
    assert message(eval_fraction=1.0) == "--eval-fraction must be in [0, 1), got 1.0"
    assert message(min_lr_ratio=2.0) == "--min-lr-ratio must be between 0 and 1, got 2.0"
    assert message(weight_decay=-1.0) == "--weight-decay must be at least 0, got -1.0"
    assert message(lr=float("inf")) == "--lr must be greater than 0 and finite, got inf"
    assert message(fused_linear="maybe") == "--fused-linear must be one of auto, on, off, got 'maybe'"


def test_eval_and_demo_check_their_flags(tmp_path):
    line = one_line_error(run("eval", "--model", tmp_path, "--store", tmp_path, "--batch-size", 0))
    assert "--batch-size must be at least 1, got 0" in line
    line = one_line_error(run("demo", "--out", tmp_path / "demo", "--steps", 0, "--no-progress"))
    assert "--steps must be at least 1, got 0" in line


def test_a_config_file_end_to_end(tiny_teacher, corpus_file, tmp_path):
    """The real job: the file's settings reach the store's manifest, and a flag wins over the file."""
    config = tmp_path / "cache.yaml"
    config.write_text(f"teacher: {tiny_teacher}\ndata: {corpus_file}\nseq_len: 32\nmax_sequences: 4\n"
                      "k: 8\nbatch_size: 2\nshard_size: 2\nprogress: false\n")
    result = run("cache", "--config", config, "--out", tmp_path / "store", "--k", 4)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "store" / "manifest.json").read_text())["config"]
    assert (saved["seq_len"], saved["max_sequences"], saved["k"], saved["shard_size"]) == (32, 4, 4, 2)
