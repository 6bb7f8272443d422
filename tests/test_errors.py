"""One table of mistakes a user can make, each with the one line it must get: exit status 1, the
message, no traceback, and nothing half-written left behind as if complete. (A disk filling up
while shards are written is in test_cli: it needs a patched writer.)"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from softcache.cli import main


@pytest.fixture(scope="module")
def world(tiny_teacher, corpus_file, tmp_path_factory):
    """Everything the mistakes below are made with: a teacher, corpora, stores, students, runs."""
    root = tmp_path_factory.mktemp("mistakes")
    base = ["--teacher", str(tiny_teacher), "--seq-len", 32, "--max-sequences", 12, "--k", 8, "--batch-size", 4,
            "--shard-size", 4, "--no-progress"]
    store = root / "store"
    assert run("cache", *base, "--data", corpus_file, "--out", store).exit_code == 0
    no_tokenizer = root / "no-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_teacher / "config.json", no_tokenizer / "config.json")
    (root / "empty.jsonl").write_text("")
    (root / "numbers.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(5)))
    (root / "a-file").write_text("x")
    student = root / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 2, "max_position_embeddings": 64}))
    small = root / "small.json"
    small.write_text(json.dumps({**json.loads(student.read_text()), "vocab_size": 100}))
    other_tokenizer = root / "other-tokenizer-student"
    from conftest import train_tokenizer
    train_tokenizer(other_tokenizer, vocab_size=300)
    (other_tokenizer / "config.json").write_text(json.dumps({**json.loads(student.read_text()), "vocab_size": 384}))
    for name, damage in (("no-manifest-json", "not json"), ("newer", "newer"), ("no-layout", "no layout"),
                         ("missing-shard", "missing"), ("truncated-shard", "truncated"), ("unfinished", "unfinished")):
        copy = root / name
        shutil.copytree(store, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        shard_files = [copy / shard["files"][-1]["path"] for shard in manifest["shards"]]
        if damage == "not json":
            (copy / "manifest.json").write_text("{not json")
        elif damage == "newer":
            (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
        elif damage == "no layout":
            (copy / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "layout"}))
        elif damage == "missing":  # every shard, so the first batch meets one
            for shard_file in shard_files:
                shard_file.unlink()
        elif damage == "truncated":
            for shard_file in shard_files:
                shard_file.write_bytes(shard_file.read_bytes()[:-3])
        else:
            (copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False, "shards": []}))
    train = ["train", "--student", student, "--steps", 2, "--batch-size", 2, "--num-workers", 0, "--no-progress"]
    assert run(*train, "--store", store, "--out", root / "run").exit_code == 0
    corrupt = root / "corrupt-run"
    shutil.copytree(root / "run", corrupt)
    for checkpoint in (corrupt / "checkpoints").iterdir():
        checkpoint.write_bytes(b"not a checkpoint")
    # student and run mistakes
    settings = json.loads(student.read_text())
    (root / "no-model-type.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "model_type"}))
    (root / "no-model-type-dir").mkdir()
    shutil.copy(root / "no-model-type.json", root / "no-model-type-dir" / "config.json")
    (root / "llamma.json").write_text(json.dumps({**settings, "model_type": "llamma"}))
    (root / "not-json.json").write_text('{"model_type": "llama",')
    (root / "t5.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 384, "d_model": 32}))
    (root / "latin1.json").write_bytes(json.dumps({**settings, "name": "\xe9"}, ensure_ascii=False).encode("latin-1"))
    from transformers import AutoConfig, AutoModelForCausalLM
    saved = root / "saved-student"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings)).save_pretrained(saved)
    for name in ("truncated-weights", "reshaped-student", "headless-student", "bad-tokenizer-student"):
        shutil.copytree(saved, root / name)
    weights = root / "truncated-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    reshaped = json.loads((saved / "config.json").read_text())
    (root / "reshaped-student" / "config.json").write_text(json.dumps({**reshaped, "intermediate_size": 48}))
    from safetensors.torch import load_file, save_file
    tensors = load_file(saved / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, root / "headless-student" / "model.safetensors", metadata={"format": "pt"})
    for item in tiny_teacher.iterdir():
        if "token" in item.name:
            shutil.copy(item, root / "bad-tokenizer-student" / item.name)
    (root / "bad-tokenizer-student" / "tokenizer.json").write_text('{"version": ')
    (root / "seed.yaml").write_text("seed: -3\n")
    for name in ("garbled-metrics-run", "damaged-record-run"):
        shutil.copytree(root / "run", root / name)
    metrics = (root / "garbled-metrics-run" / "metrics.jsonl").read_text().splitlines()
    (root / "garbled-metrics-run" / "metrics.jsonl").write_text("\n".join(["{not json", *metrics[1:]]) + "\n")
    (root / "damaged-record-run" / "config.json").write_text('{"config": {"batch_size": 2}, "sto')
    changed = root / "changed-student.json"  # trained, then edited in place: the checkpoint no longer fits
    changed.write_text(student.read_text())
    assert run(*train[:2], changed, *train[3:], "--store", store, "--out", root / "changed-run").exit_code == 0
    changed.write_text(json.dumps({**settings, "hidden_size": 64}))
    return {"root": root, "base": base, "store": store, "corpus": corpus_file, "train": train, "student": student,
            "no_tokenizer": no_tokenizer, "small": small, "other_tokenizer": other_tokenizer}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cache(w, **changes):
    args = {"--data": w["corpus"], "--out": w["fresh"] / "store", **changes}
    base = list(w["base"])
    for flag, value in list(args.items()):
        if flag in base:
            base[base.index(flag) + 1] = value
            del args[flag]
    return ["cache", *base, *[x for pair in args.items() for x in pair]]


def train(w, store=None, out=None, *extra):
    return [*w["train"], "--store", store or w["store"], "--out", out or w["fresh"] / "run", *extra]


def with_student(w, name, out=None, *extra):
    """``train`` with the student ``name`` from the world's root."""
    args = train(w, None, out, *extra)
    return [*args[:2], w["root"] / name, *args[3:]]


MISTAKES = [
    ("teacher path missing", lambda w: cache(w, **{"--teacher": w["root"] / "nowhere"}), "is not a directory"),
    ("teacher without a tokenizer", lambda w: cache(w, **{"--teacher": w["no_tokenizer"]}),
     "could not load a tokenizer"),
    ("corpus missing", lambda w: cache(w, **{"--data": w["root"] / "missing.jsonl"}), "does not exist"),
    ("corpus empty", lambda w: cache(w, **{"--data": w["root"] / "empty.jsonl"}), "empty.jsonl"),
    ("corpus without the text column", lambda w: cache(w, **{"--text-column": "body"}), "has no column 'body'"),
    ("corpus that is not text", lambda w: cache(w, **{"--data": w["root"] / "numbers.jsonl"}), "not text"),
    ("seq_len below 2", lambda w: cache(w, **{"--seq-len": 1}), "--seq-len must be at least 2, got 1"),
    ("k below 1", lambda w: cache(w, **{"--k": 0}), "--k must be at least 1, got 0"),
    ("k above the vocabulary", lambda w: cache(w, **{"--k": 999}), "--k 999 is larger than the teacher's vocabulary"),
    ("temperature not above 0", lambda w: cache(w, **{"--temperature": 0}), "--temperature must be greater than 0"),
    ("output path is a file", lambda w: cache(w, **{"--out": w["root"] / "a-file"}), "is a file"),
    ("output not writable (a read-only filesystem: tests run as root)",
     lambda w: cache(w, **{"--out": "/proc/softcache-store"}), "--out /proc/softcache-store is not writable"),
    ("output holds a different store", lambda w: cache(w, **{"--out": w["store"], "--k": 4}),
     "holds a different store (encoding.k: store has 8, this run 4"),
    ("manifest not JSON", lambda w: ["info", w["root"] / "no-manifest-json"], "is not valid JSON"),
    ("manifest from a newer format", lambda w: ["info", w["root"] / "newer"], "format version 99, newer than"),
    ("manifest missing fields", lambda w: ["info", w["root"] / "no-layout"], "lacks required fields: layout"),
    ("a shard missing", lambda w: train(w, w["root"] / "missing-shard"), "is missing; the store is damaged"),
    ("a shard truncated", lambda w: train(w, w["root"] / "truncated-shard"), "bytes, expected"),
    ("student vocab smaller than the store's ids", lambda w: [*train(w)[:2], w["small"], *train(w)[3:]],
     "has 100 output ids but the store's teacher uses 384"),
    ("tokenizer mismatch", lambda w: [*train(w)[:2], w["other_tokenizer"], *train(w)[3:]], "different tokenizer"),
    ("resume with changed settings", lambda w: train(w, None, w["root"] / "run", "--resume", "--lr", "0.5"),
     "--resume with changed settings (lr: run has 0.001, now 0.5"),
    ("a corrupt checkpoint", lambda w: train(w, None, w["root"] / "corrupt-run", "--resume"), "is damaged"),
    ("training on an unfinished store", lambda w: train(w, w["root"] / "unfinished"), "is incomplete"),
    ("training into another run's directory", lambda w: train(w, None, w["root"] / "run"),
     "already holds a training run; pass --resume"),
    ("both --steps and --epochs", lambda w: train(w, None, None, "--epochs", 1), "give --steps or --epochs, not both"),
    # student, run-directory and option mistakes (issue 13 item 1)
    ("student config without model_type", lambda w: with_student(w, "no-model-type.json"),
     "no-model-type.json has no model_type; add one"),
    ("student directory whose config.json lacks model_type", lambda w: with_student(w, "no-model-type-dir"),
     "no-model-type-dir/config.json has no model_type"),
    ("student model_type transformers does not know", lambda w: with_student(w, "llamma.json"),
     "model_type 'llamma' is not one this transformers knows (did you mean 'llama'?)"),
    ("student model_type with no causal LM", lambda w: with_student(w, "t5.json"),
     "model_type 't5' has no causal LM in transformers; give a decoder-only model"),
    ("student config not JSON", lambda w: with_student(w, "not-json.json"), "not-json.json is not valid JSON"),
    ("student config not UTF-8", lambda w: with_student(w, "latin1.json"), "latin1.json is not UTF-8 text (byte"),
    ("student weights truncated", lambda w: with_student(w, "truncated-weights"),
     "truncated-weights: the weights file model.safetensors is damaged or not a safetensors file"),
    ("student weights missing a tensor", lambda w: with_student(w, "headless-student"),
     "its weights lack 1 tensor(s) the model needs (e.g. lm_head.weight)"),
    ("model weights of another shape than its config (eval)",
     lambda w: ["eval", "--model", w["root"] / "reshaped-student", "--store", w["store"]],
     "--model {root}/reshaped-student: its weights do not fit its config.json"),
    ("student tokenizer files damaged", lambda w: with_student(w, "bad-tokenizer-student"),
     "bad-tokenizer-student: its tokenizer files do not load"),
    ("negative --seed (train)", lambda w: train(w, None, None, "--seed", -1),
     "--seed must be between 0 and 4294967295, got -1"),
    ("--seed beyond 32 bits (cache)", lambda w: cache(w, **{"--seed": 2**32}),
     "--seed must be between 0 and 4294967295, got 4294967296"),
    ("negative seed in a cache --config file", lambda w: cache(w, **{"--config": w["root"] / "seed.yaml"}),
     "seed.yaml: --seed must be between 0 and 4294967295, got -3"),
    ("too many --num-workers", lambda w: train(w, None, None, "--num-workers", 65),
     "--num-workers must be between 0 and 64, got 65"),
    ("an integer option beyond 64 bits", lambda w: train(w, None, None, "--checkpoint-every", 2**64),
     "--checkpoint-every must fit in 64 bits"),
    ("a garbled metrics.jsonl line on --resume", lambda w: train(w, None, w["root"] / "garbled-metrics-run", "--resume"),
     "garbled-metrics-run/metrics.jsonl line 1 is not a metrics record"),
    ("a damaged run config.json on --resume", lambda w: train(w, None, w["root"] / "damaged-record-run", "--resume"),
     "damaged-record-run/config.json is not a softcache run record (not valid JSON"),
    ("a checkpoint that no longer fits the student on --resume",
     lambda w: with_student(w, "changed-student.json", w["root"] / "changed-run", "--resume"),
     "does not fit this run's student or optimiser"),
]


@pytest.mark.parametrize("name,args,message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_gets_one_clear_line(world, tmp_path, name, args, message):
    world = {**world, "fresh": tmp_path}
    result = run(*args(world))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message.replace("{root}", str(world["root"])) in lines[0], lines[0]
    assert "Traceback" not in result.output
    # Refused runs leave nothing; one stopped by damaged data in its first step leaves no model.
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "store" / "manifest.json").exists() or not json.loads(
        (tmp_path / "store" / "manifest.json").read_text())["complete"]
