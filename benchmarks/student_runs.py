"""What the quality benchmarks' student runs share: their settings on the command line.

benchmarks/quality.py and benchmarks/cross_tokenizer.py train students of the demo's shape for the
same number of steps on the same batch size, learning rate and KD weight, one run per seed, so that
their tables read alike; the defaults are the demo's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEEDS = [0, 1, 2, 3, 4]


def add_student_arguments(parser: argparse.ArgumentParser, seeds_help: str) -> None:
    """--steps, --alpha, --batch-size, --lr, --seeds and --seq-len, with the demo's defaults."""
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help=seeds_help)
    parser.add_argument("--seq-len", type=int, default=256)


def student_benchmark_setup(doc: str, seeds_help: str, work: Path, more=None) -> tuple[argparse.Namespace, Path, Path]:
    """The command line of a benchmark that trains students of the demo's shape (the arguments above,
    --max-sequences and --work, defaulting to ``work``, and what ``more(parser)`` adds): ``(args, work
    directory, student config)``, the directory made and the demo's student config written into it."""
    from softcache.demo import STUDENT

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_student_arguments(parser, seeds_help)
    parser.add_argument("--max-sequences", type=int, default=None, help="cut the corpus (quick checks only)")
    parser.add_argument("--work", default=str(work))
    if more is not None:
        more(parser)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    student_config = work / "student.json"
    student_config.write_text(json.dumps(STUDENT))
    return args, work, student_config


def pyplot():
    """matplotlib's pyplot on a file-only backend, or None (with a line saying so) where it is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def store_complete(root) -> bool:
    """Whether a teacher job finished the store at ``root`` (absent, or stopped part-way: False, to be resumed)."""
    from softcache.store import open_store

    return (Path(root) / "manifest.json").exists() and open_store(root, allow_incomplete=True).complete


def run_or_report(main, write_report, name: str) -> None:
    """A benchmark's entry point: ``--report-only`` rewrites its report from results/<name>.json (no
    training), anything else runs ``main``."""
    import sys

    if len(sys.argv) == 2 and sys.argv[1] == "--report-only":
        write_report(json.loads((Path(__file__).parent / "results" / f"{name}.json").read_text()))
    else:
        main()
