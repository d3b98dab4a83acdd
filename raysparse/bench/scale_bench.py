"""`raysparse bench scale`: every stage of a run on synthetic logs shaped like MovieLens-25M, at growing sizes.

Shape (MovieLens-25M: 162,541 users, 59,047 items, 25,000,095 ratings, a median user of ~70 ratings, mean ~155):
the catalogue is 59,047 items with item texts and power-law popularity at every size; users grow with the log
(162,541 x size / 25M) so the mean user keeps ~155 interactions (log-normal activity, sigma 1.2). Smaller sizes
are what sampling users of the big log would give: same catalogue, fewer users.

Each size runs in a fresh process (generation, untimed, in another one before it), whose stages print one
JSON line each:
  start Ray                  ray.init of a local cluster (fixed cost)
  read+validate+split        `ray_data.prepare_data_ray`: Ray Data read, validation against the catalogue,
                             per-user group-by, leave-one-out split
  text features              MiniLM over every item text, cached on disk (a progress bar on stderr): cold at
                             the first size, read from the cache at the later ones (it scales with the
                             catalogue, not with the log)
  training examples          the Ray Dataset of training windows (`ray_train.training_dataset`)
  train 1 epoch              one epoch of configs/accuracy.yaml's model through Ray Train + DeepSpeed, with
                             sampled softmax (--negatives shared negatives per batch: the full softmax over
                             59k items costs ~50x the compute per step)
  evaluate every user        full-ranking test NDCG@10 of every evaluated user, in chunks of
                             train.eval_batch_size users (memory flat in the number of users)
Memory: the peak, over each stage, of the summed proportional set size (PSS: shared pages split between the
processes that map them, so Ray's object store counts once) of the bench process and every process under it
(GCS, raylet, Ray Data and Train workers) -- what the box must hold, sampled every 0.2 s.

Goals (issue 17, 2 cores / 24 GiB): the largest size completes with a peak <= 16 GiB; each stage's seconds per
million interactions at the largest size within 1.3x of the smallest size's; evaluation's added memory flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from raysparse.bench.common import print_table
from raysparse.errors import UserError

ML25M_USERS, ML25M_ITEMS, ML25M_INTERACTIONS = 162_541, 59_047, 25_000_095
ACTIVITY_SIGMA = 1.2           # log-normal spread that puts the median user near MovieLens-25M's ~70
GOAL_PEAK_GIB = 16.0
GOAL_LINEAR = 1.3              # seconds per million at the largest size / at the smallest, per stage
ACCURACY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accuracy.yaml"
STAGES = ["start Ray", "read+validate+split", "text features", "training examples", "train 1 epoch",
          "Ray Train start + checkpoint", "evaluate every user"]
# Stages whose work grows with the log. Ray's start is fixed; text features grow with the catalogue (same at
# every size, and cached after the first): neither is judged per million interactions.
LINEAR_STAGES = ["read+validate+split", "training examples", "train 1 epoch", "evaluate every user"]


def parse_size(text: str) -> int:
    """'1M' -> 1,000,000; '250k' -> 250,000; '25000000' as is."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise UserError(f"--sizes: {text!r} is not a size; write e.g. 1M,5M,25M or 250k.") from None
    if value < 10_000:
        raise UserError(f"--sizes: {text!r} is under 10k interactions, too small to time; use >= 10k.")
    return int(value)


# ------------------------------------------------------------------------------------------------ memory

def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the summed PSS of this process and all its descendants in a thread; `mark()` starts a stage
    and returns the previous stage's peak."""

    def __init__(self, interval_s: float = 0.2):
        import psutil  # a dependency of ray

        self._me = psutil.Process()
        self._interval = interval_s
        # The sampler thread and the caller's now() / mark() both touch the peak.
        self._lock = threading.Lock()
        self._peak = self._reading()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _reading(self) -> int:
        pids = [self._me.pid]
        try:
            pids += [p.pid for p in self._me.children(recursive=True)]
        except Exception:  # noqa: BLE001 - a child exiting while listed
            pass
        return sum(_pss_bytes(pid) for pid in pids)

    def now(self) -> int:
        """The tree's memory now. Every reading counts toward the stage's peak: a level the caller saw and the
        sampler's interval missed was still reached."""
        level = self._reading()
        with self._lock:
            self._peak = max(self._peak, level)
        return level

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.now()

    def mark(self) -> int:
        """The peak since the last mark (or the start); the next stage starts from the current level."""
        level = self._reading()
        with self._lock:
            peak = max(self._peak, level)
            self._peak = level
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------------ the child

def _emit(stage: str, seconds: float, memory: TreeMemory | float, rows: int, **extra) -> float:
    """Print the stage's JSON line; memory: the sampler (its peak since the last mark), or a peak in GiB."""
    peak = memory if isinstance(memory, float) else memory.mark() / 2**30
    print(json.dumps({"stage": stage, "seconds": seconds, "peak_gib": peak, "rows": rows,
                      "driver_cpu_s": time.process_time(), **extra}), flush=True)
    return peak


def _child(settings: dict) -> None:
    """All stages for one size, in this fresh process. settings: data_dir, work_dir, cache_dir, negatives,
    workers, threads, config, sets."""
    import ray
    import torch

    from raysparse.build import Prepared
    from raysparse.config import load_config
    from raysparse.engine import deepspeed_config
    from raysparse.local import build_recommender
    from raysparse.metrics import evaluate
    from raysparse.model.text import cached_item_embeddings, load_encoder, resolve_text_model
    from raysparse.ray_data import prepare_data_ray
    from raysparse.ray_train import build_trainer, training_dataset
    from raysparse.step import steps_per_epoch

    memory = TreeMemory()
    work = Path(settings["work_dir"])
    overrides = {
        "data.path": settings["data_dir"], "data.cache_dir": settings["cache_dir"], "output": str(work / "run"),
        "ray.storage_path": str(work / "ray"), "ray.num_workers": settings["workers"],
        "ray.cpus_per_worker": settings["threads"], "train.epochs": 1,
        "train.negatives_per_positive": settings["negatives"], "train.choose_text_prior": False,
        "train.max_steps_per_epoch": settings["max_steps"],
    }
    config = load_config(settings["config"], [f"{k}={v}" for k, v in overrides.items()] + settings["sets"])
    torch.set_num_threads(settings["threads"])

    t = time.perf_counter()
    ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, settings["workers"] *
                                                                     settings["threads"]),
             logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _emit("start Ray", time.perf_counter() - t, memory, 0)

    t = time.perf_counter()
    prepared: Prepared = prepare_data_ray(config)
    split = prepared.split
    n = int(split.stats["interactions"])
    _emit("read+validate+split", time.perf_counter() - t, memory, n, users=int(split.n_users),
          items=int(split.n_items), evaluated=int(len(split.evaluated_users)))

    t = time.perf_counter()
    cache = Path(config.data.resolved_cache_dir)
    cached_before = len(list(cache.glob("item_text_*.safetensors"))) if cache.exists() else 0
    encoder, tokenizer = load_encoder(config.model.text_model, config.model.trust_remote_code)
    emb = cached_item_embeddings(encoder, tokenizer, prepared.item_texts, config.model.pooling,
                                 resolve_text_model(config.model.text_model), cache, progress=True,
                                 max_length=config.data.item_text_tokens)
    cached_after = len(list(cache.glob("item_text_*.safetensors")))
    del encoder
    _emit("text features", time.perf_counter() - t, memory, int(emb.shape[0]),
          note="read from the cache" if cached_after == cached_before else "encoded (cold)")

    t = time.perf_counter()
    dataset, n_examples = training_dataset(config, prepared)
    _emit("training examples", time.perf_counter() - t, memory, n, windows=int(n_examples))

    t = time.perf_counter()
    trainer = build_trainer(config, ray.put(prepared), dataset, n_examples,
                            deepspeed_config(config, config.ray.num_workers), validate=False)
    result = trainer.fit()
    wall = time.perf_counter() - t
    record = result.metrics or {}
    steps, epoch_s = int(record.get("steps", 0)), float(record.get("train_seconds", 0.0))
    full_steps = steps_per_epoch(n_examples // config.ray.num_workers, config.train.batch_size_per_worker)
    # The epoch loop alone; when --max-train-steps cut it short, its time scaled to the full epoch's steps.
    peak = _emit("train 1 epoch", epoch_s * full_steps / max(steps, 1), memory, n, steps=steps, full_steps=full_steps,
          epoch_s=epoch_s, loss=float(record.get("loss", float("nan"))),
          examples_per_s=float(record.get("examples_per_s", 0.0)), fit_wall_s=wall)
    # What the fit costs besides the loop: worker start, model build (encoder load, item tokens), DeepSpeed
    # set-up, the checkpoint. Fixed per run, not per interaction.
    _emit("Ray Train start + checkpoint", wall - epoch_s, peak, n)

    # The trained weights: rank 0's DeepSpeed module states (ZeRO 0-2 keep the whole module there).
    t = time.perf_counter()
    del dataset
    rec = build_recommender(config, prepared, config.data.resolved_cache_dir)
    with result.checkpoint.as_directory() as folder:
        states = sorted(Path(folder).rglob("mp_rank_00_model_states.pt"))
        if not states:
            raise RuntimeError(f"no DeepSpeed model states under {folder}")
        rec.model.load_state_dict(torch.load(states[0], map_location="cpu", weights_only=False)["module"])
    rec.model.eval()
    rec.refresh()
    before = memory.now()
    result_metrics = evaluate(rec.score_users, split, "test", batch_size=config.train.eval_batch_size,
                              sampled=False)
    ndcg = float(result_metrics["overall"]["ndcg@10"])
    _emit("evaluate every user", time.perf_counter() - t, memory, n, ndcg10=ndcg,
          users=int(len(split.evaluated_users)), eval_added_gib=max(0, memory.now() - before) / 2**30)
    memory.stop()
    ray.shutdown()


# ------------------------------------------------------------------------------------------------ the driver

def _generate(out_dir: str, interactions: int, items: int, seed: int) -> dict:
    from raysparse.data.synthetic import generate_synthetic

    users = max(100, round(ML25M_USERS * interactions / ML25M_INTERACTIONS))
    return generate_synthetic(out_dir, users, items, seed=seed, n_topics=40, mean_interactions=interactions / users,
                              activity_sigma=ACTIVITY_SIGMA, text_seed=1)  # one catalogue text at every size


def _run_child(mode: str, payload: dict, stream_stderr: bool) -> list[dict]:
    """Run this module in a fresh process; its JSON lines (stdout). stderr (progress bars, Ray) passes through
    to ours when stream_stderr, else is kept for the error message."""
    proc = subprocess.run([sys.executable, "-m", "raysparse.bench.scale_bench", mode, json.dumps(payload)],
                          stdout=subprocess.PIPE, stderr=None if stream_stderr else subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        tail = "" if stream_stderr else (proc.stderr or "")[-4000:]
        raise RuntimeError(f"bench scale: the {mode} process for {payload.get('interactions', '?')} interactions "
                           f"failed (exit {proc.returncode}) after stages {[r.get('stage') for r in rows]}.\n{tail}")
    return rows


def run_scale_bench(args: argparse.Namespace) -> int:
    sizes = sorted(parse_size(s) for s in args.sizes.split(",") if s.strip())
    if not sizes:
        raise UserError("--sizes is empty; give e.g. 1M,5M,25M.")
    tmp = None
    root = args.keep
    if not root:
        tmp = tempfile.TemporaryDirectory(prefix="raysparse-bench-scale-")
        root = tmp.name
    cache = args.cache_dir or os.path.join(root, "text-cache")
    results: dict[int, list[dict]] = {}
    try:
        for size in sizes:
            data_dir = os.path.join(root, f"data-{size}-{args.items}-{args.seed}")
            if not os.path.exists(os.path.join(data_dir, "interactions.parquet")):
                t = time.perf_counter()
                counts = _run_child("--generate", {"out": data_dir, "interactions": size, "items": args.items,
                                                   "seed": args.seed},
                                    stream_stderr=False)[0]
                print(f"generated {counts['interactions']:,} interactions ({counts['users']:,} users x "
                      f"{counts['items']:,} items) in {time.perf_counter() - t:.0f} s (not timed) -> {data_dir}",
                      flush=True)
            work = os.path.join(root, f"work-{size}")
            shutil.rmtree(work, ignore_errors=True)
            settings = {"data_dir": data_dir, "work_dir": work, "cache_dir": cache, "negatives": args.negatives,
                        "workers": args.workers, "threads": args.threads, "config": args.config,
                        "sets": list(args.sets), "interactions": size, "max_steps": args.max_train_steps}
            rows = _run_child("--child", settings, stream_stderr=True)
            results[size] = rows
            for row in rows:
                print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    format_report(results)  # prints the table and the goal lines
    return 0


def format_report(results: dict[int, list[dict]]) -> str:
    """The per-stage table (seconds, seconds per million interactions, peak GiB) per size, and the goals."""
    sizes = sorted(results)
    table = []
    for stage in STAGES:
        row: dict = {"stage": stage}
        for size in sizes:
            got = {r["stage"]: r for r in results[size]}.get(stage)
            label = f"{size / 1e6:g}M"
            if got is None:
                row[f"{label} s"] = row[f"{label} s/M"] = row[f"{label} GiB"] = "-"
                continue
            n = results[size][1]["rows"]  # interactions after validation (the read stage's count)
            row[f"{label} s"] = f"{got['seconds']:.1f}"
            row[f"{label} s/M"] = f"{got['seconds'] / (n / 1e6):.1f}"
            row[f"{label} GiB"] = f"{got['peak_gib']:.2f}"
        if stage in LINEAR_STAGES and len(sizes) > 1:
            ratio = _per_million_ratio(results, stage)
            row["s/M largest / smallest"] = "-" if ratio is None else f"{ratio:.2f}"
        else:
            row["s/M largest / smallest"] = "not per interaction"
        table.append(row)
    text = [print_table(table)] if table else []
    largest = results[sizes[-1]]
    peak = max(r["peak_gib"] for r in largest)
    done = {r["stage"] for r in largest} >= set(STAGES)
    lines = [f"goal: the {sizes[-1]:,} run completes with peak <= {GOAL_PEAK_GIB:.0f} GiB: "
             f"{'MET' if done and peak <= GOAL_PEAK_GIB else 'NOT MET'} (peak {peak:.2f} GiB"
             f"{'' if done else ', not every stage ran'})"]
    if len(sizes) > 1:
        ratios = {s: _per_million_ratio(results, s) for s in LINEAR_STAGES}
        worst = max((r for r in ratios.values() if r is not None), default=None)
        lines.append(f"goal: seconds per million at {sizes[-1] / 1e6:g}M within {GOAL_LINEAR}x of {sizes[0] / 1e6:g}M "
                     f"for each stage: {'MET' if worst is not None and worst <= GOAL_LINEAR else 'NOT MET'} "
                     f"({', '.join(f'{k} {v:.2f}' for k, v in ratios.items() if v is not None)})")
        adds = [next((r.get("eval_added_gib") for r in results[s] if r["stage"] == "evaluate every user"), None)
                for s in sizes]
        lines.append("evaluation's added memory per size (flat = chunked): " +
                     ", ".join(f"{s / 1e6:g}M {a:.2f} GiB" for s, a in zip(sizes, adds) if a is not None))
    for size in sizes:
        by = {r["stage"]: r for r in results[size]}
        train, ev, read = by.get("train 1 epoch", {}), by.get("evaluate every user", {}), by.get("read+validate+split", {})
        lines.append(f"{size / 1e6:g}M: {read.get('users', '?'):,} users, {read.get('rows', 0):,} interactions, "
                     f"{by.get('training examples', {}).get('windows', 0):,} training windows, "
                     f"{train.get('steps', '?')} of {train.get('full_steps', '?')} steps"
                     f"{' (capped: seconds scaled to the full epoch)' if train.get('steps') != train.get('full_steps') else ''}"
                     f" at {train.get('examples_per_s', 0):.0f} windows/s "
                     f"(epoch loop {train.get('epoch_s', 0):.0f} s, loss {train.get('loss', float('nan')):.3f}), "
                     f"test NDCG@10 {ev.get('ndcg10', float('nan')):.4f}; text: "
                     f"{by.get('text features', {}).get('note', '?')}")
    lines.append(f"({os.cpu_count()} CPUs; peak = summed PSS of the bench process and every Ray process under it)")
    text.append("\n".join(lines))
    print(text[-1])
    return "\n".join(text)


def _per_million_ratio(results: dict[int, list[dict]], stage: str) -> float | None:
    sizes = sorted(results)
    per_m = []
    for size in (sizes[0], sizes[-1]):
        got = {r["stage"]: r for r in results[size]}.get(stage)
        if got is None:
            return None
        per_m.append(got["seconds"] / (results[size][1]["rows"] / 1e6))
    return per_m[1] / per_m[0] if per_m[0] > 0 else None


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `bench scale` to the `raysparse bench` subcommands."""
    p = bench_subparsers.add_parser("scale", help="Seconds and peak memory per stage at 1M..25M interactions.",
                                    description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1M,5M,25M", help="Interactions per run, smallest first (default 1M,5M,25M).")
    p.add_argument("--config", default=str(ACCURACY_CONFIG), help="Model config (default configs/accuracy.yaml).")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Override one config key; repeatable.")
    p.add_argument("--negatives", type=int, default=256,
                   help="Sampled-softmax negatives shared per batch (default 256; 0 = full softmax).")
    p.add_argument("--items", type=int, default=ML25M_ITEMS, help="Catalogue size at every size (default "
                                                                   "MovieLens-25M's 59,047).")
    p.add_argument("--max-train-steps", type=int, default=0,
                   help="Cap the training epoch at this many steps (0 = the whole epoch); a capped epoch's seconds "
                        "are its loop time scaled to the full epoch's steps, and the table says so.")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1).")
    p.add_argument("--threads", type=int, default=2, help="CPUs (torch threads) per worker (default 2).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the synthetic logs.")
    p.add_argument("--keep", default="", help="Keep the generated logs and runs in this folder (reused when "
                                              "present); default: a temporary folder, deleted after.")
    p.add_argument("--cache-dir", default="", help="Item-text embedding cache (default: a folder of the run, so "
                                                   "the first size encodes cold).")
    p.add_argument("--json", default="", help="Also write the per-stage rows to this JSON file.")
    p.set_defaults(func=run_scale_bench)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--generate":
        payload = json.loads(sys.argv[2])
        print(json.dumps(_generate(payload["out"], payload["interactions"], payload["items"], payload["seed"])))
    else:
        sys.exit("usage: python -m raysparse.bench.scale_bench --child|--generate JSON (run `raysparse bench scale`)")
