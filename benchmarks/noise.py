"""How much CPU the quality benchmark needs to tell two stores apart, regime by regime.

benchmarks/sampling.py trains the demo's 16 M-parameter student for 120 steps per store and seed; three
seeds there resolve about 0.12 nats between two stores, while the stores it compares differ by a few
hundredths. This benchmark trains the same rows (CE only, independent N=50, systematic N=16 and N=12,
on the stores sampling.py writes) in other regimes, the same seeds paired across rows, and reports for
each regime:

  cost         CPU-minutes of one student run: the regime's steps times its student's seconds per
               step, the median over every run of that student here (one torch thread each, two
               runs at once)
  KD gain      CE-only's held-out CE minus independent N=50's, mean ± standard error over the seeds:
               the effect the stores are there to keep
  noise        the standard deviation over seeds of a paired difference between two KD rows (pooled
               over the rows' pairs), and the same unpaired (runs of different seeds compared)
  resolves     two standard errors of such a paired difference with one CPU-hour spent on the two rows:
               2 noise / sqrt(n), n = 3600 / (2 cost x 60) seeds

The demo regime's runs are those of benchmarks/sampling.py (results/sampling.json), which are not
trained again here; the others are trained two at a time, one torch thread each.

    python benchmarks/noise.py                         # about 3 hours on 2 CPU cores (3 seeds)
    python benchmarks/noise.py --seeds 0 1             # fewer seeds
    python benchmarks/noise.py --finished-only         # report the runs already trained
    python benchmarks/noise.py --report-only           # redraw from results/noise.json

Runs are reused from --work (delete a run's directory to train it again). Writes
benchmarks/results/noise.md and noise.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import platform
import statistics
from pathlib import Path

import torch

from sampling import REFERENCE, default_codec_bytes, write_stores
from quality import cached_run
from softcache.demo import STUDENT
from student_runs import pyplot, run_or_report

HERE = Path(__file__).parent
SMALL = {**STUDENT, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
DEMO = "demo student, 120 steps"
REGIMES = {  # name: student config, steps, lr (8 x 256 tokens a step, alpha 0.5 for the KD rows)
    DEMO: (STUDENT, 120, 3e-3),  # benchmarks/sampling.py's regime
    "demo student, 120 steps, lr 0.001": (STUDENT, 120, 1e-3),  # a third of the peak learning rate
    "small student, 120 steps": (SMALL, 120, 3e-3),  # a quarter of the width, half the layers
    "small student, 360 steps": (SMALL, 360, 3e-3),  # three times as long, at about the demo's cost
    "small student, 360 steps, lr 0.001": (SMALL, 360, 1e-3),
}
ROWS = ("ce", REFERENCE, "systematic N=16", "systematic N=12")  # trained in every regime
KD_ROWS = ROWS[1:]
EXTRA_ROW = "systematic N=24"  # softcache cache's default before N=16, trained in the two 360-step regimes
MORE_ROWS = {"small student, 360 steps": (EXTRA_ROW,), "small student, 360 steps, lr 0.001": (EXTRA_ROW,)}
ALL_ROWS = (*ROWS, EXTRA_ROW)
BATCH, SEQ_LEN, ALPHA = 8, 256, 0.5


def single_threaded() -> None:
    torch.set_num_threads(1)


def train(job: tuple) -> tuple:
    """One student run in a worker process: ``job`` is (regime, row, seed, store, heldout, config, out, steps, lr)."""
    regime, row, seed, store, heldout, config, out, steps, lr = job
    result = cached_run(Path(store), Path(heldout), Path(config), Path(out), steps, BATCH, lr, seed,
                        0.0 if row == "ce" else ALPHA, None)
    return regime, row, seed, result


def slug(name: str) -> str:
    return name.replace(" ", "-").replace("=", "").replace(",", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", default=[name for name in REGIMES if name != DEMO],
                        choices=[name for name in REGIMES if name != DEMO], metavar="REGIME",
                        help=f"regimes to train (the demo's comes from results/sampling.json): "
                             f"{'; '.join(name for name in REGIMES if name != DEMO)}")
    parser.add_argument("--work", default=str(HERE / "out" / "noise"))
    parser.add_argument("--finished-only", action="store_true", help="train nothing; report the runs already trained "
                                                                      "(every run always is, whatever --seeds and --regimes)")
    args = parser.parse_args()
    if min(args.seeds) < 0:
        parser.error(f"--seeds must be at least 0, got {min(args.seeds)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stores = write_stores(HERE / "out" / "sampling", SEQ_LEN, None)
    store_of = {row: stores["configs"][REFERENCE if row == "ce" else row].out for row in ALL_ROWS}
    configs = {}
    for regime in REGIMES:
        configs[regime] = work / f"{slug(regime)}-student.json"
        configs[regime].write_text(json.dumps(REGIMES[regime][0]))

    def jobs_of(seeds, regimes):
        return [(regime, row, seed, store_of[row], stores["heldout"], configs[regime],
                 work / slug(regime) / f"{slug(row)}-seed{seed}", REGIMES[regime][1], REGIMES[regime][2])
                for seed in seeds for regime in regimes for row in (*ROWS, *MORE_ROWS.get(regime, ()))]

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context, initializer=single_threaded) as pool:
        if not args.finished_only:
            # Each seed and regime once: two workers on one run directory would race for its lock.
            trained = jobs_of(sorted(set(args.seeds)), list(dict.fromkeys(args.regimes)))
            for regime, row, seed, result in pool.map(train, trained):
                print(regime, row, seed, f"CE {result['ce']:.4f}", f"{result['seconds']:.0f} s", flush=True)
        # The report: every run finished here, of any regime and seed, not only those just trained.
        seeds = sorted({int(path.name.rsplit("-seed", 1)[1]) for path in work.glob("*/*-seed*")
                        if (path / "final").is_dir()})
        finished = [job for job in jobs_of(seeds, [name for name in REGIMES if name != DEMO])
                    if (job[6] / "final").is_dir()]
        runs, step_seconds = {}, {}
        for regime, row, seed, result in pool.map(train, finished):  # read back, not trained again
            runs.setdefault(regime, {}).setdefault(str(seed), {})[row] = result["ce"]
            student = json.dumps(REGIMES[regime][0], sort_keys=True)
            step_seconds.setdefault(student, []).append(result["seconds"] / REGIMES[regime][1])
    sampled = json.loads((HERE / "results" / "sampling.json").read_text())
    runs[DEMO] = {seed: {row: rows[row]["ce"] for row in ALL_ROWS if row in rows}
                  for seed, rows in sampled["seeded"].items()}
    results = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {multiprocessing.cpu_count()} cores",
        "batch": BATCH, "seq_len": SEQ_LEN, "alpha": ALPHA,
        "bytes_per_token": {row: default_codec_bytes(Path(store_of[row]), HERE / "out" / "sampling")
                            for row in ALL_ROWS if row != "ce"},
        "regimes": {name: {"student": student, "steps": steps, "lr": lr, "held_out_ce": runs.get(name, {}),
                           "seconds_per_step": statistics.median(
                               step_seconds.get(json.dumps(student, sort_keys=True), [math.nan]))}
                    for name, (student, steps, lr) in REGIMES.items()},
    }
    write_report(results)


def paired_sd(runs: dict, a: str, b: str, paired: bool = True) -> tuple[float, int]:
    """Standard deviation over seeds of row a's CE minus row b's: of the same seed (paired), or of each
    seed's a against the next seed's b (unpaired); and how many differences it rests on."""
    seeds = [seed for seed, rows in runs.items() if a in rows and b in rows]
    if len(seeds) < 2:
        return math.nan, len(seeds)
    shifted = seeds if paired else seeds[1:] + seeds[:1]
    differences = [runs[s][a] - runs[t][b] for s, t in zip(seeds, shifted)]
    return statistics.stdev(differences), len(differences)


def summary(regime: dict) -> dict:
    runs = regime["held_out_ce"]
    cost = regime["seconds_per_step"] * regime["steps"] / 60
    gains = [rows["ce"] - rows[REFERENCE] for rows in runs.values() if "ce" in rows and REFERENCE in rows]
    pairs = list(itertools.combinations(KD_ROWS, 2))
    paired = [paired_sd(runs, a, b) for a, b in pairs]
    unpaired = [paired_sd(runs, a, b, paired=False) for a, b in pairs]

    def pooled(values):  # root of the mean variance over the row pairs
        values = [sd for sd, n in values if not math.isnan(sd)]
        return math.sqrt(statistics.mean(sd * sd for sd in values)) if values else math.nan

    noise = pooled(paired)
    seeds_per_hour = 3600 / (2 * cost * 60)
    return {
        "cost": cost, "seeds": sum(all(row in rows for row in ROWS) for rows in runs.values()),
        "gain_seeds": len(gains),
        "gain": statistics.mean(gains) if gains else math.nan,
        "gain_se": statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else math.nan,
        "noise": noise, "unpaired": pooled(unpaired),
        "pair_noise": {f"{short(a)} - {short(b)}": sd for (a, b), (sd, _) in zip(pairs, paired)},
        "resolves": 2 * noise / math.sqrt(seeds_per_hour),
        "rows": {row: statistics.mean(rows[row] for rows in runs.values() if row in rows)
                 for row in ALL_ROWS if any(row in rows for rows in runs.values())},
        "versus_reference": {row: differences(runs, row) for row in ALL_ROWS if row != REFERENCE},
        "versus_ce": {row: differences(runs, row, "ce") for row in ALL_ROWS if row != "ce"},
    }


def differences(runs: dict, row: str, reference: str = REFERENCE) -> tuple[float, float]:
    """Mean and standard error over seeds of row's CE minus the reference row's (NaN where not measured)."""
    values = [rows[row] - rows[reference] for rows in runs.values() if row in rows and reference in rows]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def short(row: str) -> str:
    return row.replace("independent ", "ind ").replace("systematic ", "sys ")


def cell(mean: float, se: float = math.nan, digits: int = 3) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:+.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def write_report(results: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "noise.json").write_text(json.dumps(results, indent=2) + "\n")
    summaries = {name: summary(regime) for name, regime in results["regimes"].items()}
    demo_cost = summaries[DEMO]["cost"]
    lines = [
        "# The quality benchmark's noise, regime by regime",
        "",
        f"CPU: {results['machine']}. Produced by `python benchmarks/noise.py`. Every regime trains the rows CE "
        f"only, {', '.join(KD_ROWS)} (the stores of benchmarks/sampling.py; alpha {results['alpha']}, "
        f"{results['batch']} x {results['seq_len']} tokens a step), the same seeds paired across rows. Cost: "
        "the regime's steps times its student's seconds per step, the median over every run of that student "
        "here (one torch thread each, two runs at once; the demo regime's runs are those of "
        "benchmarks/sampling.py, and its student's step is timed here in the other regime). Noise: the "
        "standard deviation over seeds of the paired difference of held-out CE between two KD rows, for each "
        "pair and pooled over the three (root mean square); unpaired: the pooled figure between runs of "
        "different seeds. Resolves: two standard errors of a paired difference between two rows (pooled "
        "noise) when one CPU-hour is spent on the pair. Student: layers x width. Seeds: those that trained every "
        "row (the KD gain says where it rests on more).",
        "",
        f"| regime | student | seeds | CPU-min / run | KD gain (CE-only minus N=50) | "
        f"{' | '.join(f'noise, {short(a)} - {short(b)}' for a, b in itertools.combinations(KD_ROWS, 2))} | "
        "noise, pooled | noise, unpaired | resolves, 1 CPU-hour | resolves / KD gain |",
        "| --- | --- |" + " ---: |" * 10,
    ]
    for name, regime in results["regimes"].items():
        s = summaries[name]
        student = regime["student"]
        shape = f"{student['num_hidden_layers']} x {student['hidden_size']}"
        gain_seeds = "" if s["gain_seeds"] == s["seeds"] else f" ({s['gain_seeds']} seeds)"
        lines.append(f"| {name} | {shape} | {s['seeds']} | {s['cost']:.1f} ({s['cost'] / demo_cost:.2f}x) | "
                     f"{cell(s['gain'], s['gain_se'])}{gain_seeds} | "
                     f"{' | '.join(f'{sd:.3f}' for sd in s['pair_noise'].values())} | {s['noise']:.3f} | "
                     f"{s['unpaired']:.3f} | "
                     f"{s['resolves']:.3f} | {s['resolves'] / s['gain']:.2f} |")
    lines += ["", "Held-out CE by row, mean over the seeds, and each row minus independent N=50's (paired, mean ± "
                  "standard error):", "",
              "| regime | " + " | ".join(ALL_ROWS) + " | " + " | ".join(f"{row} minus N=50" for row in ALL_ROWS
                                                                       if row != REFERENCE) + " |",
              "| --- |" + " ---: |" * (2 * len(ALL_ROWS) - 1)]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(f"{s['rows'][row]:.3f}" if row in s["rows"] else ""
                                                 for row in ALL_ROWS)
                     + " | " + " | ".join(cell(*s["versus_reference"][row]) for row in ALL_ROWS if row != REFERENCE)
                     + " |")
    lines += ["", "![each store's students against CE-only's, regime by regime](noise.png)", ""]
    (out / "noise.md").write_text("\n".join(lines))
    plot(results, summaries, out / "noise.png")
    print("\n".join(lines))


def plot(results: dict, summaries: dict, path: Path) -> None:
    """Per regime: each store's held-out CE minus CE-only's (paired by seed, mean ± standard error)
    against its bytes per token."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(summaries), figsize=(3.2 * len(summaries), 3.6), sharey=False)
    for ax, (name, s) in zip(axes, summaries.items()):
        for number, (row, (mean, se)) in enumerate(s["versus_ce"].items()):
            if math.isnan(mean):
                continue
            x = results["bytes_per_token"][row]
            ax.errorbar(x, mean, yerr=None if math.isnan(se) else se, fmt="o", capsize=3,
                        color="#cc6677" if row == REFERENCE else "#4477aa")
            ax.annotate(row.replace("systematic ", "sys ").replace("independent ", "ind "), (x, mean),
                        textcoords="offset points", xytext=(4, 4 if number % 2 else -10), fontsize=7)
        ax.axhline(0.0, color="#999999", linewidth=1)
        ax.set_title(f"{name}\n{s['seeds']} seeds, {s['cost']:.1f} CPU-min a run", fontsize=8)
        ax.set_xlabel("bytes per token", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("held-out CE minus CE-only's (nats)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    run_or_report(main, write_report, "noise")
