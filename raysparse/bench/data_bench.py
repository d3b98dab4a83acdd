"""`raysparse bench data`: read + validate + index + split throughput and peak memory on a synthetic log.

The log is generated once (not timed) as parquet. The timed stages run in a fresh Python process so its
peak RSS measures them alone, not the generator. Goals: >= 1M interactions/s end to end, peak RSS <= 3 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from raysparse.data.dataset import index_interactions
from raysparse.data.io import read_catalogue, read_interactions
from raysparse.data.split import split_last_item
from raysparse.data.synthetic import generate_synthetic
from raysparse.errors import UserError

GOAL_RATE = 1_000_000      # interactions / s, read + validate + index + split
GOAL_RSS_GIB = 3.0


def _peak_rss_gib() -> float:
    """Peak RSS of this process. VmHWM belongs to this process's own memory map; ru_maxrss would carry over
    the parent's peak (Linux keeps it across fork + exec), i.e. the generator's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, bytes on macOS


def _child(data_dir: str) -> None:
    """Run the timed stages; print one JSON line per stage: name, seconds, rows, peak RSS so far."""
    cpu_mark = [time.process_time()]

    def emit(stage: str, seconds: float | None, rows: int | None, note: str = "") -> None:
        cpu = time.process_time()
        print(json.dumps({"stage": stage, "seconds": seconds, "cpu": cpu - cpu_mark[0], "rows": rows,
                          "rss": _peak_rss_gib(), "note": note}), flush=True)
        cpu_mark[0] = time.process_time()

    emit("start (imports)", None, None)
    t = time.perf_counter()
    items = read_catalogue(os.path.join(data_dir, "items.parquet"))
    emit("read catalogue", time.perf_counter() - t, len(items))
    t = time.perf_counter()
    interactions, report = read_interactions(os.path.join(data_dir, "interactions.parquet"), catalogue=items)
    emit("read + validate", time.perf_counter() - t, report.rows_in)
    t = time.perf_counter()
    log = index_interactions(interactions, items)
    emit("index", time.perf_counter() - t, len(log))
    del interactions
    t = time.perf_counter()
    split = split_last_item(log, cohort_fraction=0.2, cohort_ks=[1, 2, 3, 5], seed=0)
    emit("split", time.perf_counter() - t, len(log))
    del split


def run_data_bench(args: argparse.Namespace) -> int:
    target = int(args.interactions)
    if target < 1000:
        raise UserError(f"--interactions {target} is too small to time; use >= 1000.")
    n_users = max(40, target // 25)          # the generator's mean is 25 interactions per user
    n_items = max(100, min(50_000, target // 200))
    tmp = None
    data_dir = args.keep
    if not data_dir:
        tmp = tempfile.TemporaryDirectory(prefix="raysparse-bench-data-")
        data_dir = tmp.name
    try:
        t = time.perf_counter()
        counts = generate_synthetic(data_dir, n_users, n_items, seed=0)
        gen_s = time.perf_counter() - t
        print(f"generated {counts['interactions']:,} interactions ({n_users:,} users x {n_items:,} items, string ids) "
              f"in {gen_s:.1f} s (not timed) -> {data_dir}")
        proc = subprocess.run([sys.executable, "-m", "raysparse.bench.data_bench", "--child", data_dir],
                              capture_output=True, text=True)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            print(f"bench data: the timed process failed (exit {proc.returncode})", file=sys.stderr)
            return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_table(rows, counts["interactions"]))
    return 0


def format_table(rows: list[dict], n: int) -> str:
    """The stage table plus a total line judged against the goals."""
    lines = [f"{'stage':<18} {'seconds':>8} {'cpu s':>7} {'interactions/s':>15} {'peak RSS GiB':>13}"]
    total_s = total_cpu = 0.0
    peak = 0.0
    for row in rows:
        peak = max(peak, row["rss"])
        if row["seconds"] is None:  # a marker (baseline RSS after imports) or a stage that could not run
            lines.append(f"{row['stage']}: {row['note']}" if row["note"]
                         else f"{row['stage']:<18} {'-':>8} {'-':>7} {'-':>15} {row['rss']:>13.2f}")
            continue
        total_s += row["seconds"]
        total_cpu += row["cpu"]
        rate = f"{row['rows'] / row['seconds']:,.0f}" if row["seconds"] > 0 else "-"
        lines.append(f"{row['stage']:<18} {row['seconds']:>8.2f} {row['cpu']:>7.2f} {rate:>15} {row['rss']:>13.2f}")
    rate = n / total_s if total_s > 0 else float("inf")
    lines.append(f"{'total':<18} {total_s:>8.2f} {total_cpu:>7.2f} {rate:>15,.0f} {peak:>13.2f}")
    lines.append(f"goals: >= {GOAL_RATE:,} interactions/s: {'PASS' if rate >= GOAL_RATE else 'MISS'}; "
                 f"peak RSS <= {GOAL_RSS_GIB:.0f} GiB: {'PASS' if peak <= GOAL_RSS_GIB else 'MISS'} "
                 f"({n:,} interactions, {os.cpu_count()} CPUs; cpu s well below seconds = a busy machine)")
    return "\n".join(lines)


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `bench data` to the `raysparse bench` subcommands."""
    p = bench_subparsers.add_parser("data", help="Read + validate + split throughput and peak memory.",
                                    description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, default=10_000_000,
                   help="Size of the synthetic log to time (default 10,000,000).")
    p.add_argument("--keep", default="", help="Write the generated log to this folder and keep it "
                                              "(default: a temporary folder, deleted after).")
    p.set_defaults(func=run_data_bench)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        sys.exit("usage: python -m raysparse.bench.data_bench --child DATA_DIR (run `raysparse bench data`)")
