"""Benchmark: peak memory and time of the KD + CE loss with its backward, fused with the output
projection or on materialised logits.

  unfused  logits = hidden @ weight.T  ([N, V] float32, and its gradient), then distillation_loss
  fused    linear_distillation_loss(hidden, weight, ...): chunks of positions, no [N, V] tensor

N = 8,192 positions, V = 49,152 (SmolLM2's vocabulary), H = 576, top-64 targets with the tail bucket,
alpha 0.5. Each mode runs in its own process; on CPU the peak is the process's resident-set
high-water mark (reset just before the loss) minus its resident set at that moment; on CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated before. Three repetitions, medians.

    python benchmarks/fused_loss.py                 # CPU, about 2 minutes
    python benchmarks/fused_loss.py --device cuda   # on a GPU machine

Writes benchmarks/results/fused_loss.md (and .json); --device cuda writes fused_loss_cuda.*.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
MODES = ("unfused", "fused")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, args) -> dict:
    """Run one mode in this process and return its measurements."""
    from softcache.losses import distillation_loss, linear_distillation_loss

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.positions, args.hidden, generator=g) * 0.5).to(device).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).to(device).requires_grad_()
    teacher = torch.randn(args.positions, args.k, generator=g).sort(-1, descending=True).values
    logprobs = torch.log_softmax(torch.cat([teacher, torch.zeros(args.positions, 1)], -1), -1)[:, :args.k].to(device)
    ids = torch.stack([torch.randperm(args.vocab, generator=g)[: args.k] for _ in range(64)]).repeat(
        args.positions // 64 + 1, 1)[: args.positions].to(device)
    mask = torch.ones(args.positions, dtype=torch.bool, device=device)
    labels = torch.randint(0, args.vocab, (args.positions,), generator=g).to(device)

    def step():
        if mode == "fused":
            kd, ce = linear_distillation_loss(hidden, weight, ids, logprobs, mask, labels, chunk_tokens=args.chunk)
        else:
            kd, ce = distillation_loss(hidden @ weight.T, ids, logprobs, mask, labels, chunk_tokens=args.chunk)
        (0.5 * kd / args.positions + 0.5 * ce / args.positions).backward()
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    peaks, seconds = [], []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            before = _rss_kib("VmRSS") * 1024
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
        peaks.append(peak - before)
    return {"mode": mode, "peak_bytes": statistics.median(peaks), "seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--positions", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunks", default="256,1024", help="chunk sizes of the fused loss to measure")
    parser.add_argument("--chunk", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    runs = [("unfused", 256)] + [("fused", int(c)) for c in args.chunks.split(",")]
    for mode, chunk in runs:
        command = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--chunk", str(chunk)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append({**json.loads(output.strip().splitlines()[-1]), "chunk": chunk})
        print(rows[-1], flush=True)
    name = "" if args.device == "cpu" else f"_{torch.device(args.device).type}"
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    results = {"machine": gpu or f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "positions": args.positions, "vocab": args.vocab, "hidden": args.hidden,
               "k": args.k, "device": args.device, "rows": rows}
    write_report(results, name)


def write_report(results: dict, name: str) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"fused_loss{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    unfused = results["rows"][0]
    lines = [
        "# Fused vs unfused KD loss: peak memory and time of loss + backward",
        "",
        f"{results['positions']:,} positions, vocab {results['vocab']:,}, hidden {results['hidden']}, top-{results['k']} "
        f"targets, tail bucket, on {results['machine']} (torch "
        f"{results['torch']}); peak memory above what was allocated before the loss; medians of 3. Produced by "
        f"`python benchmarks/fused_loss.py{'' if results['device'] == 'cpu' else ' --device ' + results['device']}`.",
        "",
        "| loss | positions per chunk | peak memory | of unfused | s per loss + backward | of unfused |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['mode']} | {row['chunk']} | {row['peak_bytes'] / 2**20:,.0f} MiB | "
                     f"{100 * row['peak_bytes'] / unfused['peak_bytes']:.0f}% | {row['seconds']:.2f} | "
                     f"{row['seconds'] / unfused['seconds']:.2f}x |")
    lines.append("")
    (out / f"fused_loss{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
