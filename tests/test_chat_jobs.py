"""Chat stores through the command line, torchrun and a remote store, on the tiny teacher.

The rows are short conversations about Python's documentation topics rendered with a compact template
given by --chat-template (the tiny teacher's tokenizer has none of its own, and spells ChatML's markers
byte by byte): each turn is its role's initial, its content and the tokenizer's <eos> special token.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from softcache import open_store
from softcache.cli import main

from conftest import COMPACT_TEMPLATE as TEMPLATE
from test_distributed import torchrun



@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """A messages .jsonl of 40 conversations (one or two exchanges) and the template file."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("chat")
    rows = []
    for number, name in enumerate(sorted(topics)[:40]):
        text = " ".join(topics[name].split())
        messages = [{"role": "user", "content": f"What is {name}?"}, {"role": "assistant", "content": text[:90]}]
        if number % 3 == 0:
            messages += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": text[90:150]}]
        rows.append({"messages": messages})
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    template = root / "chatml.jinja"
    template.write_text(TEMPLATE)
    return str(data), str(template)


def cache_args(teacher, data, template, out, *extra) -> list[str]:
    return ["cache", "--teacher", str(teacher), "--data", data, "--chat-template", template, "--out", str(out),
            "--seq-len", "128", "--k", "8", "--batch-size", "4", "--shard-size", "3", "--no-progress", *extra]


def test_cache_info_train_resume_and_eval_on_a_chat_corpus(tiny_teacher, chat_data, tmp_path):
    data, template = chat_data
    runner = CliRunner()
    cached = runner.invoke(main, cache_args(tiny_teacher, data, template, tmp_path / "store"))
    assert cached.exit_code == 0, cached.output
    store = open_store(tmp_path / "store")
    share = store.corpus.teaching_positions / store.layout.num_tokens
    assert store.corpus.input_shape == "messages" and store.corpus.packing == "documents" and 0.1 < share < 0.9
    info = runner.invoke(main, ["info", str(tmp_path / "store")])
    assert f"({share:.1%} of {store.layout.num_tokens:,}; --train-on assistant)" in info.output
    assert "per teaching position" in info.output
    assert runner.invoke(main, ["verify", str(tmp_path / "store")]).exit_code == 0
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 128}))
    train = ["train", "--store", str(tmp_path / "store"), "--student", str(student), "--batch-size", "2",
             "--eval-fraction", "0.25", "--checkpoint-every", "2", "--num-workers", "0", "--no-progress"]
    whole = runner.invoke(main, [*train, "--out", str(tmp_path / "whole"), "--steps", "4"])
    assert whole.exit_code == 0, whole.output
    # The same run as if stopped after its checkpoint of step 2, then resumed.
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "cut" / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "cut" / "checkpoints" / "step-000000004.pt").unlink()
    shutil.rmtree(tmp_path / "cut" / "final")
    resumed = runner.invoke(main, [*train, "--out", str(tmp_path / "cut"), "--steps", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    # KD and CE count the same positions: those that teach.
    teaching = store.read(0, len(store))["teach"]
    held_out = max(1, round(len(store) * 0.25))
    assert all(x["tokens"] > 0 for x in a) and a[-1]["eval"]["tokens"] == int(teaching[-held_out:].sum())
    evaluated = runner.invoke(main, ["eval", "--model", str(tmp_path / "whole" / "final"), "--store",
                                     str(tmp_path / "store"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["tokens"] == int(teaching.sum())


@pytest.mark.slow  # 20 s; two ranks: test_distributed.py, chat rows: the tests above
def test_two_rank_chat_job_writes_the_one_rank_store(tiny_teacher, chat_data, tmp_path):
    data, template = chat_data
    one = CliRunner().invoke(main, cache_args(tiny_teacher, data, template, tmp_path / "one", "--targets", "sampled",
                                              "--samples", "10"))
    assert one.exit_code == 0, one.output
    two = torchrun(*cache_args(tiny_teacher, data, template, tmp_path / "two", "--targets", "sampled",
                               "--samples", "10"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = open_store(tmp_path / "one"), open_store(tmp_path / "two")
    assert b.verify() == [] and a.totals.content_sha256 == b.totals.content_sha256


def test_a_chat_store_at_a_url_reads_like_a_local_one(tiny_teacher, chat_data, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("SOFTCACHE_CACHE", str(tmp_path / "cache"))
    data, template = chat_data
    runner = CliRunner()
    for out in (tmp_path / "local", "memory://bucket/chat"):
        result = runner.invoke(main, cache_args(tiny_teacher, data, template, out))
        assert result.exit_code == 0, result.output
    a, b = open_store(tmp_path / "local"), open_store("memory://bucket/chat")
    assert a.totals.content_sha256 == b.totals.content_sha256 and b.verify() == []
    for name, array in a.read(0, len(a)).items():
        np.testing.assert_array_equal(array, b.read(0, len(b))[name])
    fsspec.filesystem("memory").rm("/bucket", recursive=True)
