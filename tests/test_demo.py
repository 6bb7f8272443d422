"""The demo end to end on the tiny teacher: two stores, two students, a report; a rerun reuses them."""

from __future__ import annotations

import json

import pytest

from softcache.demo import DemoConfig, run_demo


def test_demo_runs_and_reruns(tiny_teacher, tmp_path, capsys):
    config = DemoConfig(out=str(tmp_path / "demo"), teacher=str(tiny_teacher), seq_len=64, steps=2, batch_size=2,
                        max_sequences=8, progress=False)
    result = run_demo(config)
    names = [row["model"] for row in result.rows]
    assert names[0].startswith("teacher") and names[1] == "student, cross-entropy only"
    assert names[2] == "student, distilled from the store"
    assert all(row["ce"] > 0 for row in result.rows)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| student, distilled from the store |" in report and "bytes per token" in report
    assert "sampled draws" in report
    for part in ("store-train-sampled", "store-heldout", "student-ce/final", "student-kd-sampled/final"):
        assert (tmp_path / "demo" / part).exists(), part
    mtime = (tmp_path / "demo" / "student-kd-sampled" / "final" / "config.json").stat().st_mtime
    again = run_demo(config)  # reuses the stores and both students
    assert [row["ce"] for row in again.rows] == [row["ce"] for row in result.rows]
    assert (tmp_path / "demo" / "student-kd-sampled" / "final" / "config.json").stat().st_mtime == mtime
    top = run_demo(DemoConfig(**{**config.__dict__, "targets": "topk"}))  # the other kind, beside it
    assert top.rows[1]["ce"] == result.rows[1]["ce"] and (tmp_path / "demo" / "store-train-topk").is_dir()


@pytest.mark.slow  # multi-process or whole-demo; pytest -m slow
def test_chat_demo_trains_on_assistant_tokens_only(tiny_teacher, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from conftest import COMPACT_TEMPLATE
    from softcache import open_store

    teacher = tmp_path / "chat-teacher"  # the tiny teacher with a chat template (its own has none)
    shutil.copytree(tiny_teacher, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = COMPACT_TEMPLATE
    tokenizer.save_pretrained(teacher)
    config = DemoConfig(out=str(tmp_path / "demo"), teacher=str(teacher), chat_seq_len=256, steps=2,
                        batch_size=2, progress=False, chat=True)
    result = run_demo(config)
    assert result.report.name == "report-chat.md" and "(chat)" in result.report.read_text()
    heldout = open_store(tmp_path / "demo" / "store-heldout-chat")
    assert heldout.encoding.masked and heldout.encoding.documents
    assert heldout.corpus.source == "builtin:python-docs-chat" and heldout.corpus.input_shape == "messages"
    # Students are measured on the held-out assistant positions only.
    metrics = (tmp_path / "demo" / "student-chat-ce" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["eval"]["tokens"] == heldout.corpus.teaching_positions
    assert (tmp_path / "demo" / "student-chat-kd-sampled" / "final").is_dir()
