"""What the quality benchmarks' student runs share: their settings on the command line.

benchmarks/quality.py and benchmarks/cross_tokenizer.py train students of the demo's shape for the
same number of steps on the same batch size, learning rate and KD weight, one run per seed, so that
their tables read alike; the defaults are the demo's.
"""

from __future__ import annotations

import argparse

SEEDS = [0, 1, 2, 3, 4]


def add_student_arguments(parser: argparse.ArgumentParser, seeds_help: str) -> None:
    """--steps, --alpha, --batch-size, --lr, --seeds and --seq-len, with the demo's defaults."""
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help=seeds_help)
    parser.add_argument("--seq-len", type=int, default=256)
