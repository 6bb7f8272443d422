"""One table of mistakes a user can make, each with the one line it must get: exit status 1, the
message, no traceback, and nothing half-written left behind as if complete. (A disk filling up
while shards are written is in test_cli: it needs a patched writer.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from softcache.cli import main

from conftest import edit_manifest, with_digest_everywhere, with_shard


@pytest.fixture(scope="module")
def world(tiny_teacher, corpus_file, tmp_path_factory):
    """Everything the mistakes below are made with: a teacher, corpora, stores, students, runs."""
    root = tmp_path_factory.mktemp("mistakes")
    base = ["--teacher", str(tiny_teacher), "--seq-len", 32, "--max-sequences", 12, "--targets", "topk", "--k", 8, "--batch-size", 4,
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
            edit_manifest(copy, lambda m: {k: v for k, v in m.items() if k != "layout"})
        elif damage == "missing":  # every shard, so the first batch meets one
            for shard_file in shard_files:
                shard_file.unlink()
        elif damage == "truncated":
            for shard_file in shard_files:
                shard_file.write_bytes(shard_file.read_bytes()[:-3])
        else:
            edit_manifest(copy, lambda m: {**m, "complete": False, "shards": []})
    train = ["train", "--student", student, "--steps", 2, "--batch-size", 2, "--num-workers", 0, "--no-progress"]
    assert run(*train, "--store", store, "--out", root / "run").exit_code == 0
    corrupt = root / "corrupt-run"
    shutil.copytree(root / "run", corrupt)
    for checkpoint in (corrupt / "checkpoints").iterdir():
        checkpoint.write_bytes(b"not a checkpoint")
    # corpus edge cases
    documents = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    for name, files in {
        "mixed-dir": {"a.txt": documents[0], "b.jsonl": corpus_file.read_text(), "notes/summary.pdf": "%PDF"},
        "unsupported-dir": {"model.bin": "x", "weights.safetensors": "x"},
        "hidden-only-dir": {".draft.txt": documents[0]},
        "corpus-dir": {"docs.jsonl": corpus_file.read_text()},
    }.items():
        for file, text in files.items():
            (root / name / file).parent.mkdir(parents=True, exist_ok=True)
            (root / name / file).write_text(text)
    shutil.copytree(root / "corpus-dir", root / "store-in-corpus-dir")
    shutil.copytree(store, root / "store-in-corpus-dir" / "old-store")
    (root / "no-text.jsonl").write_text('{"text": ""}\n{"text": null}\n{"id": 3}\n{"text": "  "}\n')
    (root / "whitespace.txt").write_text("  \n\n\t \n")
    (root / "utf16.txt").write_text(documents[0], encoding="utf-16")
    (root / "latin1.txt").write_bytes(b"Caf\xe9 au lait " * 100)
    (root / "bad-line.jsonl").write_text(corpus_file.read_text().replace("\n", "\n{\"text\": \"unclosed}\n", 1))
    (root / "array-line.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n["c", "d"]\n')
    # a pipe in the corpus, a directory linking back to itself, a student with too few positions
    import os
    (root / "pipe-dir").mkdir()
    (root / "pipe-dir" / "a.txt").write_text(documents[0])
    os.mkfifo(root / "pipe-dir" / "b.txt")
    os.mkfifo(root / "pipe.jsonl")
    (root / "loop-dir").mkdir()
    (root / "loop-dir" / "a.bin").write_text("x")
    (root / "loop-dir" / "again").symlink_to(root / "loop-dir")
    (root / "short.json").write_text(json.dumps({**json.loads(student.read_text()), "max_position_embeddings": 16}))
    # chat rows (issue 14)
    turns = [{"role": "user", "content": documents[0][:200]}, {"role": "assistant", "content": documents[1][:200]}]
    (root / "chat.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    (root / "robot.jsonl").write_text(json.dumps({"messages": turns}) + "\n"
                                      + json.dumps({"messages": [{**turns[0], "role": "robot"}, turns[1]]}) + "\n")
    (root / "chatml.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
                                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (root / "latin1.jinja").write_bytes("{# caf\u00e9 #}".encode("latin-1"))
    (root / "two-shapes-dir").mkdir()
    shutil.copy(root / "chat.jsonl", root / "two-shapes-dir" / "a.jsonl")
    shutil.copy(corpus_file, root / "two-shapes-dir" / "b.jsonl")
    # store, manifest and shard damage
    for name, damage in STORE_DAMAGE.items():
        shutil.copytree(store, root / name)
        damage(root / name)
    (root / "configs").mkdir()
    for name, text in {"broken.yaml": "lr: [1, 2", "unknown.yaml": "learning_rate: 0.1\n", "list.json": "[1, 2]",
                       "settings.toml": "lr = 1"}.items():
        (root / "configs" / name).write_text(text)
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
    # a LoRA run whose student's weights were replaced afterwards (issue 15)
    shutil.copytree(saved, root / "lora-student")
    lora = ["--lora-r", 2, "--out", root / "lora-run"]
    assert run(*train[:2], root / "lora-student", *train[3:], "--store", store, *lora).exit_code == 0
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings)).save_pretrained(root / "lora-student")
    (root / "configs" / "dtype.yaml").write_text("student_dtype: float16\n")
    # device maps of a teacher too big for one device (issue 16)
    whole = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
             "lm_head": "disk"}
    for name, placed in {"gpu-map.json": {**whole, "lm_head": 99}, "typo-map.json": {**whole, "model.layerz": "disk"},
                         "partial-map.json": {"model.embed_tokens": "cpu", "model.layers": "disk"},
                         "tpu-map.json": {**whole, "model.norm": "tpu"}, "list-map.json": list(whole)}.items():
        (root / name).write_text(json.dumps(placed))
    (root / "broken-map.json").write_text("{not json")
    return {"root": root, "base": base, "store": store, "corpus": corpus_file, "train": train, "student": student,
            "no_tokenizer": no_tokenizer, "small": small, "other_tokenizer": other_tokenizer}


def _flip(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def _zarr_meta(copy: Path, array: str, **changes) -> None:
    path = copy / "data.zarr" / "shards" / "00000" / array / "zarr.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _manifest_text(copy: Path, old: str, new: str) -> None:
    path = copy / "manifest.json"
    path.write_text(path.read_text().replace(old, new, 1))


STORE_DAMAGE = {
    "edited-unsealed": lambda c: _manifest_text(c, '"seq_len": 32', '"seq_len": 33'),
    "unsealed": lambda c: _manifest_text(c, '"manifest_sha256"', '"x"'),
    "entry-removed": lambda c: edit_manifest(c, lambda m: {**m, "shards": [m["shards"][0], m["shards"][2]]}),
    "count-edited": lambda c: edit_manifest(c, lambda m: with_shard(m, 1, count=3)),
    "totals-edited": lambda c: edit_manifest(c, lambda m: {**m, "totals": {**m["totals"], "tokens": 1}}),
    "digest-edited": lambda c: edit_manifest(c, lambda m: with_digest_everywhere(m, 0)),
    "path-outside": lambda c: edit_manifest(c, lambda m: with_shard(m, 0, files=[{**m["shards"][0]["files"][0],
                                                                              "path": "../elsewhere/zarr.json"}])),
    "wrong-type": lambda c: edit_manifest(c, lambda m: {**m, "layout": {**m["layout"], "seq_len": "32"}}),
    "unknown-codec": lambda c: edit_manifest(c, lambda m: {**m, "storage": {**m["storage"], "codec": {"name": "lz9"}}}),
    "other-tool": lambda c: edit_manifest(c, lambda m: {**m, "format": "other-store"}),
    "older-format": lambda c: edit_manifest(c, lambda m: {**m, "format_version": 2}),
    "flipped-shard": lambda c: [_flip(p, 40) for p in sorted(c.glob("data.zarr/shards/*/target_ids/c/*"))],
    "one-flipped-shard": lambda c: _flip(c / "data.zarr" / "shards" / "00001" / "input_ids" / "c" / "0" / "0", 7),
    "huge-shape": lambda c: _zarr_meta(c, "target_ids", shape=[4_000_000_000]),
    "unlisted-file": lambda c: (c / "data.zarr" / "shards" / "00000" / "stray.bin").write_bytes(b"x"),
    "damaged-tokenizer": lambda c: _flip(c / "tokenizer" / "tokenizer.json", 100),
    "no-tokenizer-dir": lambda c: shutil.rmtree(c / "tokenizer"),
    "linked-out": lambda c: _link_out(c),
}
"""Copies of the world's store, each damaged one way (made in the ``world`` fixture)."""


def _link_out(copy: Path) -> None:
    target = copy.parent / "outside-shard"
    shutil.copytree(copy / "data.zarr" / "shards" / "00000", target)
    shutil.rmtree(copy / "data.zarr" / "shards" / "00000")
    (copy / "data.zarr" / "shards" / "00000").symlink_to(target)


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
    # corpus edge cases (issue 13 item 7)
    ("corpus directory with a file of no supported type", lambda w: cache(w, **{"--data": w["root"] / "mixed-dir"}),
     "mixed-dir: notes/summary.pdf is of no supported type and would be skipped"),
    ("corpus directory of unsupported files only", lambda w: cache(w, **{"--data": w["root"] / "unsupported-dir"}),
     "unsupported-dir: model.bin, weights.safetensors are of no supported type"),
    ("corpus directory of hidden files only", lambda w: cache(w, **{"--data": w["root"] / "hidden-only-dir"}),
     "hidden-only-dir holds no files to read (names starting with '.' are not read)"),
    ("corpus of empty documents only", lambda w: cache(w, **{"--data": w["root"] / "no-text.jsonl"}),
     "no-text.jsonl has no text to cache: its 4 documents are all empty or whitespace"),
    ("corpus of whitespace only", lambda w: cache(w, **{"--data": w["root"] / "whitespace.txt"}),
     "whitespace.txt has no text to cache: its one document is empty or whitespace"),
    ("corpus file in UTF-16", lambda w: cache(w, **{"--data": w["root"] / "utf16.txt"}),
     "utf16.txt is not UTF-8 (byte 0 invalid start byte; it looks like UTF-16); re-encode it as UTF-8"),
    ("corpus file in Latin-1", lambda w: cache(w, **{"--data": w["root"] / "latin1.txt"}),
     "latin1.txt is not UTF-8 (byte 3 invalid continuation byte; it may be Latin-1"),
    ("corpus with a malformed JSON line", lambda w: cache(w, **{"--data": w["root"] / "bad-line.jsonl"}),
     "bad-line.jsonl line 2, column 10: not valid JSON (Unterminated string starting)"),
    ("corpus with a JSON line that is not an object", lambda w: cache(w, **{"--data": w["root"] / "array-line.jsonl"}),
     "array-line.jsonl line 3: a JSON array, not an object"),
    ("store inside its corpus directory", lambda w: cache(w, **{"--data": w["root"] / "corpus-dir",
                                                                "--out": w["root"] / "corpus-dir" / "store"}),
     "/corpus-dir/store is inside --data "),
    ("store in place of its corpus directory", lambda w: cache(w, **{"--data": w["root"] / "corpus-dir",
                                                                     "--out": w["root"] / "corpus-dir"}),
     "corpus-dir is inside --data "),
    ("corpus directory holding a softcache store", lambda w: cache(w, **{"--data": w["root"] / "store-in-corpus-dir"}),
     "store-in-corpus-dir/old-store, which is not corpus text"),
]


MISTAKES += [
    # store, manifest and shard damage; options and config files (issue 13 items 2, 3 and 8)
    ("manifest edited without its seal", lambda w: ["info", w["root"] / "edited-unsealed"],
     "manifest.json fails its checksum (manifest_sha256): it changed after softcache wrote it"),
    ("manifest without its seal", lambda w: ["verify", w["root"] / "unsealed"], "manifest.json has no manifest_sha256"),
    ("a shard entry removed from the manifest", lambda w: train(w, w["root"] / "entry-removed"),
     "the shard table lists 2 shards for a layout of 3 (missing: 1)"),
    ("a shard's sequence count edited", lambda w: ["info", w["root"] / "count-edited"],
     "shard 1 claims sequences 4..6, the layout puts 4..7 there"),
    ("the totals edited", lambda w: train(w, w["root"] / "totals-edited"), "totals.tokens is 1, the shard table adds up"),
    ("a content digest edited with its totals", lambda w: train(w, w["root"] / "digest-edited"),
     "shard 0 holds columns whose content digest differs from its record's"),
    ("a shard file named outside the store", lambda w: ["info", w["root"] / "path-outside"],
     "'../elsewhere/zarr.json' leaves the store"),
    ("a manifest field of the wrong type", lambda w: ["info", w["root"] / "wrong-type"], "layout.seq_len is \"32\", not int"),
    ("a codec the format cannot read", lambda w: ["info", w["root"] / "unknown-codec"],
     "storage.codec is {\"name\": \"lz9\"}, which the zarr format cannot read"),
    ("a manifest of another tool", lambda w: ["info", w["root"] / "other-tool"], "is not a softcache manifest"),
    ("a store from an older format", lambda w: ["info", w["root"] / "older-format"],
     "format version 2, from an older softcache"),
    ("a flipped byte in a shard", lambda w: train(w, w["root"] / "flipped-shard"), "fails its sha256 checksum"),
    ("verify: a flipped byte in a shard", lambda w: ["verify", w["root"] / "one-flipped-shard"],
     "shard 1: data.zarr/shards/00001/input_ids/c/0/0 fails its sha256 checksum"),
    ("damaged shard metadata read with checksums off",
     lambda w: train(w, w["root"] / "huge-shape", None, "--no-verify-shards"),
     "shard 0 declares target_ids as uint16[4000000000], which a shard of 4 sequences cannot hold"),
    ("verify: a data file no record lists", lambda w: ["verify", w["root"] / "unlisted-file"],
     "data.zarr/shards/00000/stray.bin is in the store but no record lists it"),
    ("a damaged tokenizer file in the store", lambda w: train(w, w["root"] / "damaged-tokenizer"),
     "the store's tokenizer file tokenizer/tokenizer.json fails its sha256 checksum"),
    ("the store's tokenizer removed", lambda w: train(w, w["root"] / "no-tokenizer-dir"),
     "the store's tokenizer file tokenizer/"),
    ("a shard that links out of the store", lambda w: train(w, w["root"] / "linked-out"), "resolves outside the store"),
    ("info on a path that does not exist", lambda w: ["info", w["root"] / "nowhere"], "nowhere does not exist"),
    ("a plain directory as a store", lambda w: train(w, w["no_tokenizer"]), "is not a softcache store (no manifest.json)"),
    ("resuming a teacher job into a damaged manifest", lambda w: cache(w, **{"--out": w["root"] / "edited-unsealed"}),
     "fails its checksum"),
    ("convert an incomplete store", lambda w: ["convert", w["root"] / "unfinished", w["fresh"] / "store", "--format",
                                               "arrow", "--no-progress"], "is incomplete"),
    ("convert into a file", lambda w: ["convert", w["store"], w["root"] / "a-file", "--format", "arrow",
                                       "--no-progress"], "a-file is a file; give a directory"),
    ("convert into a directory that is not a store", lambda w: ["convert", w["store"], w["root"] / "run", "--format",
                                                               "arrow", "--no-progress"],
     "is not empty and holds no softcache store"),
    ("convert a damaged store", lambda w: ["convert", w["root"] / "flipped-shard", w["fresh"] / "store", "--format",
                                           "arrow", "--no-progress"], "fails its sha256 checksum"),
    ("an infinite learning rate", lambda w: train(w, None, None, "--lr", "inf"), "--lr must be greater than 0 and finite"),
    ("a NaN gradient clip", lambda w: train(w, None, None, "--clip-grad", "nan"), "--clip-grad must be at least 0 and"),
    ("a negative weight decay", lambda w: train(w, None, None, "--weight-decay", "-1"),
     "--weight-decay must be at least 0, got -1"),
    ("an infinite student temperature", lambda w: train(w, None, None, "--temperature", "inf"), "--temperature must be"),
    ("a beta of 1", lambda w: train(w, None, None, "--loss", "jsd", "--beta", "1"), "--beta must be"),
    ("an alpha above 1", lambda w: train(w, None, None, "--alpha", "1.5"), "--alpha must be"),
    ("a held-out fraction of 1", lambda w: train(w, None, None, "--eval-fraction", "1"), "--eval-fraction must be"),
    ("a top-p above 1", lambda w: cache(w, **{"--targets": "topp", "--top-p": "1.5"}), "--top-p must be"),
    ("a NaN teacher temperature", lambda w: cache(w, **{"--temperature": "nan"}), "--temperature must be"),
    ("a --config file that is not valid YAML", lambda w: train(w, None, None, "--config", w["root"] / "configs" / "broken.yaml"),
     "broken.yaml is not valid YAML"),
    ("a --config file with an unknown setting",
     lambda w: train(w, None, None, "--config", w["root"] / "configs" / "unknown.yaml"), "unknown setting 'learning_rate'"),
    ("a --config file that is not a mapping", lambda w: train(w, None, None, "--config", w["root"] / "configs" / "list.json"),
     "must hold a mapping of settings to values, not a list"),
    ("a --config file of another type", lambda w: cache(w, **{"--config": w["root"] / "configs" / "settings.toml"}),
     "give a .yaml, .yml or .json file, not .toml"),
    ("a named pipe in a corpus directory", lambda w: cache(w, **{"--data": w["root"] / "pipe-dir"}),
     "pipe-dir: b.txt is not a regular file (a pipe, socket, device or broken link)"),
    ("a named pipe as the corpus", lambda w: cache(w, **{"--data": w["root"] / "pipe.jsonl"}),
     "pipe.jsonl is not a regular file or a directory"),
    ("a corpus directory that links back to itself", lambda w: cache(w, **{"--data": w["root"] / "loop-dir"}),
     "loop-dir: a.bin is of no supported type"),
    ("a student with fewer positions than the store's sequences", lambda w: with_student(w, "short.json"),
     "short.json admits 16 positions but the store's sequences have 32 tokens"),
    ("a --config file that does not exist", lambda w: train(w, None, None, "--config", w["root"] / "configs" / "none.yaml"),
     "none.yaml does not exist"),
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
    # chat rows and the packing flags (issue 14)
    ("an --input-shape whose columns the corpus lacks", lambda w: cache(w, **{"--input-shape": "messages"}),
     "docs.jsonl: --input-shape messages needs the column 'messages' (columns: text, id)"),
    ("--train-on assistant on text rows", lambda w: cache(w, **{"--train-on": "assistant"}),
     "--train-on assistant needs chat rows (messages or prompt_completion); --data {corpus} holds text rows"),
    ("--long truncate with a stream", lambda w: cache(w, **{"--long": "truncate"}),
     "--long truncate needs whole documents (--packing documents or none)"),
    ("--chat-template on text rows", lambda w: cache(w, **{"--chat-template": w["root"] / "chatml.jinja"}),
     "--chat-template renders messages and prompt_completion rows; --data {corpus} holds text rows"),
    ("a --chat-template file that does not exist",
     lambda w: cache(w, **{"--data": w["root"] / "chat.jsonl", "--chat-template": w["root"] / "none.jinja"}),
     "--chat-template {root}/none.jinja does not exist"),
    ("a --chat-template file that is not UTF-8",
     lambda w: cache(w, **{"--data": w["root"] / "chat.jsonl", "--chat-template": w["root"] / "latin1.jinja"}),
     "--chat-template {root}/latin1.jinja is not UTF-8 text (byte 6 is 0xe9)"),
    ("chat rows and a teacher without a chat template", lambda w: cache(w, **{"--data": w["root"] / "chat.jsonl"}),
     "the teacher's tokenizer has no chat template to render messages rows with; pass one with --chat-template FILE"),
    ("--packing stream on chat rows",
     lambda w: cache(w, **{"--data": w["root"] / "chat.jsonl", "--packing": "stream"}),
     "--packing stream joins text documents into one stream; messages rows are packed whole"),
    # LoRA and students from anywhere (issue 15)
    ("--lora-r on a student without weights", lambda w: train(w, None, None, "--lora-r", 4),
     "--lora-r trains an adapter on a pretrained student, but --student {root}/student.json has no weights"),
    ("--lora-target-modules naming no linear module",
     lambda w: with_student(w, "saved-student", None, "--lora-r", 4, "--lora-target-modules", "q_proj,qkv"),
     "--lora-target-modules: 'qkv' is not a linear module of --student {root}/saved-student; its linear modules are "
     "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or give all-linear)"),
    ("--lora-target-modules naming nothing", lambda w: with_student(w, "saved-student", None, "--lora-r", 4,
                                                                   "--lora-target-modules", ","),
     "--lora-target-modules ',' names no module; give comma-separated module names"),
    ("--merge-lora without --lora-r", lambda w: with_student(w, "saved-student", None, "--merge-lora"),
     "--merge-lora needs --lora-r: LoRA is off at --lora-r 0 (the default)"),
    ("--lora-alpha without --lora-r", lambda w: with_student(w, "saved-student", None, "--lora-alpha", 16),
     "--lora-alpha needs --lora-r"),
    ("a negative --lora-r", lambda w: train(w, None, None, "--lora-r", -1), "--lora-r must be at least 0, got -1"),
    ("a --lora-dropout of 1", lambda w: train(w, None, None, "--lora-r", 4, "--lora-dropout", 1),
     "--lora-dropout must be in [0, 1), got 1.0"),
    ("a --lora-alpha of 0", lambda w: train(w, None, None, "--lora-r", 4, "--lora-alpha", 0),
     "--lora-alpha must be greater than 0, got 0.0"),
    ("a LoRA run resumed on a student whose weights changed",
     lambda w: with_student(w, "lora-student", w["root"] / "lora-run", "--lora-r", 2, "--resume"),
     "was trained on other frozen weights than --student {root}/lora-student holds now"),
    ("a --student that is no file, directory or hub id", lambda w: with_student(w, "no/such/student"),
     "--student {root}/no/such/student does not exist (give a config.json, a model directory or a hub id)"),
    ("a --student-dtype the student job does not train in",
     lambda w: train(w, None, None, "--config", w["root"] / "configs" / "dtype.yaml"),
     "dtype.yaml: --student-dtype must be one of float32, bfloat16, got 'float16'"),
    ("a chat row with an unknown role", lambda w: cache(w, **{"--data": w["root"] / "robot.jsonl",
                                                              "--chat-template": w["root"] / "chatml.jinja"}),
     "--data {root}/robot.jsonl: row 1, column 'messages': turn 0 has the role 'robot'; roles are system, user, "
     "assistant, tool (rows count from 0; --skip-bad-rows skips such rows)"),
    ("a corpus directory holding two input shapes", lambda w: cache(w, **{"--data": w["root"] / "two-shapes-dir"}),
     "two-shapes-dir/b.jsonl holds text rows (columns: text, id) but {root}/two-shapes-dir/a.jsonl holds messages "
     "rows; every file of --data must hold rows of one input shape"),
    # FSDP students (issue 15 item 3)
    ("--fsdp-cpu-offload without --fsdp", lambda w: train(w, None, None, "--fsdp-cpu-offload"),
     "--fsdp-cpu-offload offloads FSDP's shards; add --fsdp, or drop --fsdp-cpu-offload"),
    ("--fsdp-cpu-offload on the CPU", lambda w: train(w, None, None, "--fsdp", "--fsdp-cpu-offload", "--device", "cpu"),
     "--fsdp-cpu-offload moves FSDP's shards off a GPU; on cpu they are in CPU memory already"),
    ("resuming a DDP run with --fsdp", lambda w: train(w, None, w["root"] / "run", "--resume", "--fsdp"),
     "--resume with changed settings (fsdp: run has False, now True)"),
    ("--fsdp with a LoRA student", lambda w: train(w, None, None, "--fsdp", "--lora-r", 4),
     "--fsdp does not train LoRA adapters yet"),
    # a teacher placed over several devices (issue 16)
    ("--max-memory without --device-map", lambda w: cache(w, **{"--max-memory": "cpu=1GiB"}),
     "--max-memory needs --device-map: it places a teacher split over several devices; add --device-map auto"),
    ("--gpus-per-rank without --device-map", lambda w: cache(w, **{"--gpus-per-rank": 2}),
     "--gpus-per-rank needs --device-map"),
    ("--offload-folder without --device-map", lambda w: cache(w, **{"--offload-folder": w["root"]}),
     "--offload-folder needs --device-map"),
    ("--device with --device-map", lambda w: cache(w, **{"--device-map": "auto", "--device": "cpu"}),
     "give --device or --device-map, not both: --device-map auto places the teacher itself"),
    ("--device-map neither a strategy nor a file", lambda w: cache(w, **{"--device-map": "everywhere"}),
     "--device-map everywhere is not one of auto, balanced, sequential, nor a JSON file mapping module names to "
     "devices (no such file)"),
    ("--device-map file that is not JSON", lambda w: cache(w, **{"--device-map": w["root"] / "broken-map.json"}),
     "--device-map {root}/broken-map.json is not valid JSON"),
    ("--device-map file that is a list", lambda w: cache(w, **{"--device-map": w["root"] / "list-map.json"}),
     "--device-map {root}/list-map.json must map module names to devices"),
    ("--device-map file with an unknown device", lambda w: cache(w, **{"--device-map": w["root"] / "tpu-map.json"}),
     "--device-map {root}/tpu-map.json puts 'model.norm' on 'tpu'; give a GPU number (0, 1, ...), cuda:N, cpu or "
     "disk"),
    ("--device-map onto a GPU this rank lacks", lambda w: cache(w, **{"--device-map": w["root"] / "gpu-map.json"}),
     "--device-map {root}/gpu-map.json puts lm_head on GPU 99, but this "),
    ("--device-map naming no module of the teacher",
     lambda w: cache(w, **{"--device-map": w["root"] / "typo-map.json"}),
     "--device-map {root}/typo-map.json names 'model.layerz', which is no module of --teacher"),
    ("--device-map leaving weights unplaced", lambda w: cache(w, **{"--device-map": w["root"] / "partial-map.json"}),
     "could not load the model placed by --device-map {root}/partial-map.json (ValueError: The device_map provided "
     "does not give any device for the following parameters: model.norm.weight, lm_head.weight)"),
    ("--max-memory that is not DEVICE=SIZE", lambda w: cache(w, **{"--device-map": "auto", "--max-memory": "64GiB"}),
     "--max-memory 64GiB: '64GiB' is not DEVICE=SIZE; give e.g. 0=20GiB,1=20GiB,cpu=64GiB"),
    ("--max-memory with a size in no unit", lambda w: cache(w, **{"--device-map": "auto", "--max-memory": "cpu=2GB+"}),
     "--max-memory cpu=2GB+: '2GB+' is not a size"),
    ("--max-memory for an unknown device", lambda w: cache(w, **{"--device-map": "auto", "--max-memory": "ram=2GB"}),
     "--max-memory ram=2GB: unknown device 'ram'; give a GPU number of this rank (0, 1, ...) or cpu"),
    ("--max-memory for a GPU this rank lacks",
     lambda w: cache(w, **{"--device-map": "auto", "--max-memory": "99=2GB,cpu=1GB"}),
     "--max-memory 99=2GB,cpu=1GB names GPU 99, but this "),
    ("--max-memory with a device-map file",
     lambda w: cache(w, **{"--device-map": w["root"] / "typo-map.json", "--max-memory": "cpu=2GB"}),
     "--max-memory applies to --device-map auto, balanced, sequential; the device map {root}/typo-map.json places "
     "every module itself: drop --max-memory"),
    ("--offload-folder that is a file",
     lambda w: cache(w, **{"--device-map": "auto", "--offload-folder": w["root"] / "a-file"}),
     "--offload-folder {root}/a-file is not a directory; give an existing one"),
    ("--gpus-per-rank 0", lambda w: cache(w, **{"--device-map": "auto", "--gpus-per-rank": 0}),
     "--gpus-per-rank must be at least 1, got 0"),
    # corpora from elsewhere (issue 16 item 2); a dataset in no cache: tests/test_corpus_sources.py (needs offline mode)
    ("Hugging Face dataset without a name", lambda w: cache(w, **{"--data": "hf:owner/"}),
     "--data hf:owner/: give a Hugging Face dataset as hf:owner/name or hf:owner/name:config"),
    ("corpus URL that does not exist", lambda w: cache(w, **{"--data": "memory://nowhere/corpus.jsonl"}),
     "--data memory://nowhere/corpus.jsonl does not exist"),
    ("corpus URL of an unknown protocol", lambda w: cache(w, **{"--data": "nosuch://bucket/corpus.jsonl"}),
     "--data nosuch://bucket/corpus.jsonl could not be listed: ValueError: Protocol not known: nosuch"),
]


@pytest.mark.parametrize("name,args,message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_gets_one_clear_line(world, tmp_path, name, args, message):
    world = {**world, "fresh": tmp_path}
    result = run(*args(world))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    message = message.replace("{root}", str(world["root"])).replace("{corpus}", str(world["corpus"]))
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    # Refused runs leave nothing; one stopped by damaged data in its first step leaves no model.
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "store" / "manifest.json").exists() or not json.loads(
        (tmp_path / "store" / "manifest.json").read_text())["complete"]


# Stores at URLs: the settings read from the environment (softcache.store.remote) and what goes wrong on
# the way; each run with a cache of its own (SOFTCACHE_CACHE) and the world's stores as file:// URLs.
URL_MISTAKES = [
    ("a SOFTCACHE_CACHE_LIMIT that is no size", {"SOFTCACHE_CACHE_LIMIT": "50 gigs"}, "store",
     "SOFTCACHE_CACHE_LIMIT must be a size such as 50GiB, 800MB or 1000000 (bytes), got '50 gigs'"),
    ("SOFTCACHE_ATTEMPTS of 0", {"SOFTCACHE_ATTEMPTS": "0"}, "store",
     "SOFTCACHE_ATTEMPTS must be a whole number of at least 1, got '0'"),
    ("a SOFTCACHE_TIMEOUT that is no number", {"SOFTCACHE_TIMEOUT": "5 min"}, "store",
     "SOFTCACHE_TIMEOUT must be a number of seconds of at least 0, got '5 min'"),
    ("a negative SOFTCACHE_PREFETCH", {"SOFTCACHE_PREFETCH": "-2"}, "store",
     "SOFTCACHE_PREFETCH must be a whole number of at least 0, got '-2'"),
    ("a shard missing from a store at a URL", {}, "missing-shard", "is missing"),
    ("a URL that holds no store", {}, "nowhere", "/nowhere is not a softcache store (no manifest.json)"),
]


@pytest.mark.parametrize("name,env,store,message", URL_MISTAKES, ids=[m[0] for m in URL_MISTAKES])
def test_each_url_mistake_gets_one_clear_line(world, tmp_path, name, env, store, message):
    world = {**world, "fresh": tmp_path}
    args = train(world, f"file://{world['root']}/{store}")
    result = CliRunner().invoke(main, [str(a) for a in args], env={"SOFTCACHE_CACHE": str(tmp_path / "cache"), **env})
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()
