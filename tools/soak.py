"""Kill real jobs with SIGKILL at random moments, rerun them, and check nothing was lost or changed.

Each trial starts a job as a subprocess (its own process group), kills the whole group with SIGKILL
after a random delay, reruns the same command to the end (``--resume`` for students), and compares
the result with an uninterrupted reference run:
  teacher   the store's shard files, byte for byte, and its content digest
  ranks     the same, for a 2-rank torchrun teacher job with one rank killed (torchrun stops the other)
  student   the final weights, bit for bit, and every logged loss

The tests (tests/test_crash.py) run a few trials of each; this script runs many, for soak testing:

    python tools/soak.py --runs 20                 # tiny random teacher built on the spot
    python tools/soak.py --runs 50 --kinds teacher,student

It prints one line per trial and how many runs were identical; the exit status is 1 if any was not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOFTCACHE = [sys.executable, "-m", "softcache"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "softcache"]


def killed_then_finished(command: list[str], delay: float, rerun: list[str] | None = None,
                         one_child: bool = False) -> bool:
    """Run ``command``, SIGKILL it after ``delay`` seconds unless it is done, then run ``rerun``
    (default: the same command) to completion. True when the kill landed.

    ``one_child``: kill one of the launcher's child processes (one torchrun rank) instead, and let the
    launcher tear the others down. Whatever is left afterwards is killed before the rerun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    try:
        process.wait(timeout=delay)
        landed = False
    except subprocess.TimeoutExpired:
        children = _descendants(process.pid, direct=True)
        victim = random.choice(children) if one_child and children else process.pid
        family = _descendants(process.pid) + [process.pid]
        os.kill(victim, signal.SIGKILL)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in family:  # nothing of the killed job may outlive it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
        landed = True
    finished = subprocess.run(rerun or command, capture_output=True, text=True, env=env)
    if finished.returncode != 0:
        lines = [line.strip() for line in finished.stderr.strip().splitlines() if line.strip()]
        # softcache's own one-line errors when there are any (a torchrun rank's too); otherwise the end
        # of the output, which for torchrun holds the failed rank's root cause, not just ChildFailedError
        errors = [line for line in lines if "error: " in line] or lines[-25:]
        raise RuntimeError(f"the rerun of {' '.join(command[-20:])} failed (exit {finished.returncode}): "
                           + " | ".join(errors[:25]))
    return landed


def _descendants(pid: int, direct: bool = False) -> list[int]:
    """Process ids below ``pid`` (Linux /proc), children first."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = [] if direct else children
    return found


def shard_files(root: Path) -> dict[str, bytes]:
    """Every data file of a store (manifest, tokenizer, progress records and lock excluded)."""
    skip = ("manifest.json", "tokenizer/", "progress/", "writer.lock")
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


def cache_command(teacher: str, data: str, out: Path) -> list[str]:
    """A teacher job of the default target kind, in many small shards (many points to be killed at)."""
    return ["cache", "--teacher", teacher, "--data", data, "--out", str(out), "--seq-len", "16", "--max-sequences",
            "200", "--batch-size", "2", "--shard-size", "4", "--no-progress"]


def train_command(store: Path, student: Path, out: Path) -> list[str]:
    return ["train", "--store", str(store), "--student", str(student), "--out", str(out), "--steps", "60",
            "--batch-size", "4", "--checkpoint-every", "2", "--num-workers", "0", "--no-progress"]


def teacher_trial(work: Path, teacher: str, data: str, reference: Path, delay: float, ranks: bool = False) -> dict:
    out = work / "store"
    shutil.rmtree(out, ignore_errors=True)
    launcher = TORCHRUN if ranks else SOFTCACHE
    landed = killed_then_finished(launcher + cache_command(teacher, data, out), delay, one_child=ranks)
    same = shard_files(out) == shard_files(reference) and _digest(out) == _digest(reference)
    return {"kind": "ranks" if ranks else "teacher", "delay": round(delay, 2), "killed": landed, "identical": same}


def student_trial(work: Path, store: Path, student: Path, reference: Path, delay: float) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    command = SOFTCACHE + train_command(store, student, out)
    landed = killed_then_finished(command, delay, rerun=command + ["--resume"])
    same = _weights(out) == _weights(reference) and _losses(out) == _losses(reference)
    return {"kind": "student", "delay": round(delay, 2), "killed": landed, "identical": same}


def references(work: Path, teacher: str, data: str, student: Path) -> tuple[Path, Path, dict]:
    """An uninterrupted store and student run to compare trials with, and how long each took (s)."""
    store, run = work / "reference-store", work / "reference-run"
    timings = work / "reference-seconds.json"
    if not timings.exists():
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        seconds = {}
        for name, command in (("teacher", cache_command(teacher, data, store)),
                              ("student", train_command(store, student, run))):
            started = time.perf_counter()
            subprocess.run(SOFTCACHE + command, check=True, capture_output=True)
            seconds[name] = time.perf_counter() - started
        timings.write_text(json.dumps(seconds))
    return store, run, json.loads(timings.read_text())


def kill_delay(rng: random.Random, job_seconds: float) -> float:
    """A random moment in the job's working part (after about 2.5 s of imports and loading)."""
    return rng.uniform(min(2.5, 0.5 * job_seconds), max(job_seconds, 2.6))


def _digest(store: Path) -> str:
    return json.loads((store / "manifest.json").read_text())["totals"]["content_sha256"]


def _weights(run: Path) -> dict:
    from safetensors.numpy import load_file

    return {name: array.tobytes() for name, array in load_file(str(run / "final" / "model.safetensors")).items()}


def _losses(run: Path) -> list:
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def tiny_setup(work: Path) -> tuple[str, str, Path]:
    """A tiny random teacher, a corpus and a student config, built like the tests' fixtures."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_teacher  # noqa: E402

    from softcache.corpus import python_docs

    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        make_teacher(teacher)
    data = work / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in python_docs()[40:60]))
    student = work / "student.json"
    student.write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 2, "max_position_embeddings": 64}))
    return str(teacher), str(data), student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="trials per kind")
    parser.add_argument("--kinds", default="teacher,student,ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="softcache-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher, data, student = tiny_setup(work)
    store, run, seconds = references(work, teacher, data, student)
    rng = random.Random(args.seed)
    results = []
    for trial in range(args.runs):
        for kind in args.kinds.split(","):
            if kind == "student":
                result = student_trial(work, store, student, run, kill_delay(rng, seconds["student"]))
            else:
                result = teacher_trial(work, teacher, data, store, kill_delay(rng, seconds["teacher"]),
                                       ranks=kind == "ranks")
            results.append(result)
            print(json.dumps(result), flush=True)
    killed = [r for r in results if r["killed"]]
    identical = sum(r["identical"] for r in results)
    print(f"{identical} of {len(results)} runs identical to the uninterrupted reference "
          f"({len(killed)} were killed before they finished, {sum(r['identical'] for r in killed)} of those identical)")
    sys.exit(0 if identical == len(results) else 1)


if __name__ == "__main__":
    main()
