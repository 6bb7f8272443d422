"""The main job in one command: run the teacher once, train two students, show that distillation pays.

On the built-in Python-docs corpus, split into train and held-out topics, with the built-in
SmolLM2-135M-Instruct teacher: cache both splits (the training split as sampled targets with
`softcache cache`'s default draws, benchmarks/results/sampling.md; the held-out split as top-64, to
measure KL to the teacher), then train two students of the same small configuration from the same
initialisation for the same steps on the same batches, one with
cross-entropy only and one distilled from the store, and compare everyone's held-out loss.
Everything lands in one run directory; a rerun reuses the stores and the finished students.

``--chat`` does the same for chat distillation: the corpus is builtin:python-docs-chat
(softcache.chat_corpus), rendered with the teacher's chat template, packed with documents kept
apart, and only the assistant's tokens teach and are measured; sequences are 512 tokens.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from softcache.cache_job import run_cache
from softcache.config import MAX_SEED, CacheConfig, TrainConfig
from softcache.errors import SoftcacheError
from softcache.logs import notes
from softcache.settings import setting
from softcache.store import open_store
from softcache.train_job import METRICS, run_train

log = logging.getLogger(__name__)
# A ~16 M-parameter Llama (12.6 M of it the tied 49,152 x 256 embedding): small enough to train in
# minutes on two CPU cores, big enough to learn something from 100k tokens.
STUDENT = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}


@dataclass
class DemoConfig:
    """Settings of ``softcache demo``. The fields made with ``setting`` are its flags (of the same name);
    the others are fixed for the demo and set only from Python."""

    out: str = setting("runs/demo", help="Run directory for the stores, students and report.")
    teacher: str = setting("builtin:smollm2", help="Teacher (as for softcache cache).")
    seq_len: int = 256
    """Tokens per sequence of the text demo."""
    chat_seq_len: int = 512
    """Tokens per sequence of the chat demo: a conversation of builtin:python-docs-chat is 150-450 tokens."""
    targets: str = setting("sampled", choices=("sampled", "topk"),
                           help="The training store's targets: softcache cache's default sampled draws per "
                                "position (unbiased, about 21 bytes/token), or the top 64 ids (134 bytes/token).")
    samples: int = CacheConfig.samples
    """Draws per position of a sampled training store: softcache cache's default."""
    k: int = 64
    """Ids per position of a topk training store, and of the held-out store."""
    steps: int = setting(120, ge=1, help="Optimiser steps of each student.")
    batch_size: int = 8
    lr: float = 3e-3
    alpha: float = 0.5
    """Weight of the KD loss for the distilled student (the other student has alpha 0)."""
    seed: int = setting(0, ge=0, le=MAX_SEED, help="Seed of both students (same initialisation).")
    chat: bool = setting(False, help="Chat distillation instead: conversations about the Python docs "
                                     "(builtin:python-docs-chat) in the teacher's chat template, only the assistant's "
                                     "tokens teach and are measured.")
    progress: bool = setting(True, help="Progress bars on stderr.")
    max_sequences: int | None = None
    """Sequences of each store (None: the whole corpus split); tests cut the corpus with it."""


@dataclass
class DemoResult:
    out: Path
    rows: list[dict]
    bytes_per_token: float
    targets: str = "top-64 log-probs"
    report: Path | None = None
    """The report's file (report.md, or report-chat.md for a chat demo)."""

    def table(self) -> str:
        lines = ["| model | held-out CE (nats/token) | perplexity | KL to teacher | top-1 agreement | train time |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in self.rows:
            kl = "" if row.get("kl") is None else f"{row['kl']:.3f}"
            agree = "" if row.get("top1_agreement") is None else f"{row['top1_agreement']:.3f}"
            seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f} s"
            lines.append(f"| {row['model']} | {row['ce']:.3f} | {math.exp(row['ce']):.1f} | {kl} | {agree} | {seconds} |")
        lines.append("")
        lines.append(f"Training store: {self.bytes_per_token:.1f} bytes per token ({self.targets}).")
        return "\n".join(lines)


def run_demo(config: DemoConfig) -> DemoResult:
    """Both teacher jobs, both students and the report; notes are logged unless ``progress`` is off."""
    with notes(config.progress):
        return _run(config)


def _run(config: DemoConfig) -> DemoResult:
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise SoftcacheError(f"--out {out} is a file; give a directory for the demo")
    kind = "chat-" if config.chat else ""
    data = "builtin:python-docs-chat" if config.chat else "builtin:python-docs"
    seq_len = config.chat_seq_len if config.chat else config.seq_len
    stores, names = {}, {"train": f"store-train-{kind}{config.targets}", "heldout": f"store-heldout{'-chat' * config.chat}"}
    for split in ("train", "heldout"):
        log.info(f"== teacher job: {config.teacher} over {data} ({split} topics)")
        targets = {"targets": config.targets, "samples": config.samples} if split == "train" else {"targets": "topk"}
        result = run_cache(CacheConfig(teacher=config.teacher, data=data, split=split,
                                       out=str(out / names[split]), seq_len=seq_len, k=config.k,
                                       batch_size=8, max_sequences=config.max_sequences, progress=config.progress,
                                       **targets))
        log.info(result.summary())
        stores[split] = open_store(out / names[split])
    student = out / "student.json"
    student.write_text(json.dumps(STUDENT, indent=2) + "\n")

    rows = [{"model": f"teacher ({config.teacher})", "ce": stores["heldout"].totals.teacher_ce}]
    for name, alpha in (("student, cross-entropy only", 0.0), ("student, distilled from the store", config.alpha)):
        run_dir = out / (f"student-{kind}ce" if alpha == 0 else f"student-{kind}kd-{config.targets}")
        log.info(f"== {name} ({config.steps} steps)")
        train = TrainConfig(store=str(out / names["train"]), student=str(student), out=str(run_dir), steps=config.steps,
                            batch_size=config.batch_size, lr=config.lr, alpha=alpha, seed=config.seed,
                            eval_store=str(out / names["heldout"]), checkpoint_every=50, num_workers=0,
                            progress=config.progress, resume=(run_dir / "config.json").exists())
        if (run_dir / "final").is_dir() and _finished(run_dir, train):
            log.info(f"{run_dir} is already trained; reusing it")
        else:
            log.info(run_train(train).summary())
        rows.append({"model": name, **_final_eval(run_dir)})
    train = stores["train"]
    result = DemoResult(out, rows, train.totals.bytes_per_token, train.targets.describe(),
                        out / f"report{'-chat' * config.chat}.md")
    result.report.write_text(_report(config, result, data, seq_len))
    return result


def _finished(run_dir: Path, train: TrainConfig) -> bool:
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    wanted = asdict(train)
    same = all(saved.get(key) == wanted[key] for key in ("steps", "alpha", "lr", "seed", "batch_size", "student"))
    return same and any("eval" in line and json.loads(line)["step"] == train.steps
                        for line in (run_dir / METRICS).read_text().splitlines())


def _final_eval(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    evaluation = lines[-1]["eval"]
    return {"ce": evaluation["ce"], "kl": evaluation["kl"], "top1_agreement": evaluation["top1_agreement"],
            "seconds": sum(line["tokens"] / line["tokens_per_s"] for line in lines)}


def _report(config: DemoConfig, result: DemoResult, data: str, seq_len: int) -> str:
    chat = (" rendered with the teacher's chat template, conversations packed apart; only the assistant's tokens "
            "teach and are measured" if config.chat else "")
    return "\n".join([
        f"# softcache demo{' (chat)' * config.chat}",
        "",
        f"Teacher {config.teacher}; corpus {data} (train topics for training, every fifth topic "
        f"held out){chat}; sequences of {seq_len} tokens; training targets: {result.targets}; held-out "
        f"targets: top-{config.k}. Both students: the same "
        f"{sum(1 for _ in STUDENT)}-key Llama config (`student.json`), seed {config.seed}, {config.steps} steps of "
        f"{config.batch_size} sequences, lr {config.lr}; the distilled one uses alpha {config.alpha}.",
        "",
        result.table(),
        "",
    ])
