"""`raysparse bench accuracy`: every model on the leave-one-out protocol, side by side, over several seeds.

Protocol (raysparse.data.split): validation reads the training history and ranks the validation item; test
reads the training history + the validation item and ranks the test item; every item outside the input is
ranked. Every row gets the same input.

Rows: popularity, EASE, iALS, SASRec (+ the text prior), the zero-shot text baselines (text, EASE + text), and
our sequence model in four variants by default (plus any `--ablation`): ids only, ids + text, ids + DMF, fused
(ids + text + DMF); `--variants text` adds the DMF item column design. Each seed re-draws the sparse cohort
(data.split_seed) and re-seeds training. Baselines are tuned on the first seed's validation split
(raysparse.bench.baselines). Our models pick their epoch by validation NDCG@10, and what must differ between
data sets (`--our-grid`: by default the dropout rate, model.dropout 0.3 or 0.5) is chosen like the baselines'
grids: the fused model is fitted at each grid point on the first seed, and the point with the best validation
NDCG@10 is used by every row of ours on every seed.
The test split decides nothing, and configs/accuracy.yaml is used unchanged on every data set.

Our models train through the same code as `raysparse train`: on local Ray (Ray Train + DeepSpeed, one
worker) with `--trainer ray`, or in-process with `--trainer local` (same model, step and data code).
Before the fits the run prints how long it will take on this machine (`time_estimate`: a few training steps
timed on the data), since a larger data set than the dev sets can take hours.
Output: a markdown table (mean ± std over seeds), JSON with every number, and a PNG chart by cohort.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from raysparse.artifact import read_config
from raysparse.bench.baselines import run_baselines
from raysparse.bench.common import DEFAULT_ML, dataset_folder, guess_format, load_frames
from raysparse.bench.finished_jobs import FinishedJobs, run_fingerprint
from raysparse.build import prepare_data
from raysparse.config import load_config
from raysparse.errors import UserError
from raysparse.local import run_local
from raysparse.metrics import flatten, user_ndcg
from raysparse.model.text import cached_item_embeddings, load_encoder, resolve_text_model
from raysparse.step import keep_freed_memory

# Imported where used: raysparse.ray_train and ray (--trainer ray only), matplotlib (the chart; an optional
# dependency, pip install raysparse[bench]).

ACCURACY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accuracy.yaml"
BASELINE_NAMES = ["popularity", "ease", "ials", "text", "ease_text", "sasrec", "sasrec_text"]
OUR_VARIANTS = ["ids", "ids_text", "dmf", "fused"]
ROW_LABELS = {"popularity": "Popularity", "ease": "EASE", "ials": "iALS", "text": "Text zero-shot",
              "ease_text": "EASE + text", "sasrec": "SASRec",
              "sasrec_text": "SASRec + text prior", "ours:ids": "Ids only (ours)",
              "ours:ids_text": "Ids + text (ours)", "ours:dmf": "Ids + DMF (ours)",
              "ours:text": "Text + DMF column (ours)", "ours:fused": "Fused: ids + text + DMF (ours)"}
# What our model chooses on validation inside the run (first seed, fused), as SASRec chooses its dropout. The
# schedule's length is no longer searched: 20 epochs won on validation on both dev sets (on ML latest-small by
# 0.077 to 0.053-0.063), 10 only once on Amazon by a margin within seed noise, and the best epoch of the 20 is
# kept anyway (docs/ACCURACY.md, "The bench's time").
OUR_GRID = "model.dropout=0.3|0.5"
ORDER_FREE = ("ease", "ials")
# SASRec's grid on the first seed: 2 layers, 64 hidden (the best of a wider grid run once on ML latest-small),
# dropout searched; a fuller grid costs ~2 min per configuration on 2 cores.
SASREC_BENCH_GRID = {"hidden_size": [64], "num_layers": [2], "dropout": [0.2, 0.5]}
SASREC_GRID_FITS = int(np.prod([len(values) for values in SASREC_BENCH_GRID.values()]))   # on the first seed
GROUPS = ["overall", "warm", "cohort", "cohort_k1", "cohort_k2", "cohort_k3", "cohort_k5"]


def register_bench(subparsers) -> None:
    p = subparsers.add_parser("accuracy", help="Fused vs DMF vs text vs tuned baselines by sparsity cohort.")
    p.add_argument("--data", default=str(DEFAULT_ML),
                   help="Dataset folder: standard schema, a MovieLens download or the Amazon JSON layout.")
    p.add_argument("--format", default="", help="Layout of --data (movielens-latest, movielens-1m, movielens-100k, "
                                                "amazon-json); guessed when empty.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds (cohort draw + training) to average over.")
    p.add_argument("--config", default=str(ACCURACY_CONFIG), help="Config of our models.")
    p.add_argument("--set", dest="sets", action="append", default=[], help="Config override for our models.")
    p.add_argument("--baselines", default=",".join(BASELINE_NAMES), help="Baselines to run ('' = none).")
    p.add_argument("--variants", default=",".join(OUR_VARIANTS), help="Our variants to run ('' = none).")
    p.add_argument("--our-grid", default=OUR_GRID, metavar="KEY=V1|V2[,KEY=V1|V2]",
                   help="Config values our models choose on validation: the fused model is fitted at every grid "
                        "point on the first seed, the best by validation NDCG@10 is used by every row of ours on "
                        f"every seed ('' = none; default {OUR_GRID!r}).")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="An extra row of ours with config overrides, e.g. 'no-moddrop:model.modality_dropout=0' "
                        "or 'bag-dmf:model.history_encoder=bag,train.example_mode=prefix,model.variant=dmf'.")
    p.add_argument("--trainer", choices=["ray", "local"], default="ray",
                   help="ray: Ray Train + DeepSpeed on local Ray (1 worker); local: in-process loop.")
    p.add_argument("--jobs", type=int, default=1,
                   help="Fits run side by side in this many processes, each with cores // jobs torch threads "
                        "(--trainer local only). One seed's baselines are one fit, each of our rows per seed "
                        "another.")
    p.add_argument("--fast", action="store_true", help="Small grids and few epochs (smoke runs, tests).")
    p.add_argument("--on-bad-rows", choices=("fail", "quarantine"), default="fail",
                   help="'fail' (default): stop on invalid interaction rows, naming file, line and a sample. "
                        "'quarantine': set them aside in --out/quarantine.csv (counted in accuracy.md) and run "
                        "on the rest.")
    p.add_argument("--out", default="runs/accuracy", help="Where the table, JSON and chart go.")
    p.add_argument("--fresh", action="store_true",
                   help="Run every job again. By default a job an earlier run with the same code, config, data and "
                        "flags finished (saved in --out/finished as each job ends) is reused: a stopped run goes "
                        "on where it stopped, and a run with more --seeds reuses the first seeds' jobs.")
    p.set_defaults(func=run)


# ---- running ------------------------------------------------------------------------------------------------
def train_ours(config, prepared, trainer: str, prefix: str = "") -> dict:
    """Train one of our variants; returns {'val','test' (flat metrics), 'seconds', 'best_epoch', 'epochs_run',
    'test_ranks' (the full-ranking rank of each evaluated user's test item, for paired comparisons)}."""
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"    {prefix}{message}", flush=True)

    if trainer == "ray":
        from raysparse.ray_train import run_ray_training

        summary = run_ray_training(config, log=log)
        scored = read_config(Path(config.output) / "artifact").model    # with the text prior it chose
    else:
        rec, summary = run_local(config, prepared, log=log, save=False)
        scored = rec.config.model
    seconds = time.perf_counter() - t0
    users = prepared.split.evaluated_users
    return {"val": summary["val"], "test": summary["test"], "best_epoch": summary.get("best_epoch"),
            "epochs_run": len(summary["history"]),                     # fewer than train.epochs: stopped early
            "seconds": seconds, "test_ranks": summary["test_ranks"],   # ranked when the trainer measured test
            "text_prior": [scored.text_prior, scored.text_prior_items, scored.text_prior_form],
            "test_cohort_k": prepared.split.cohort_k[users].tolist()}


def item_text_embeddings(config, prepared) -> np.ndarray:
    """Frozen-encoder embedding of each item's text (the same cached table our text tower reads)."""
    encoder, tokenizer = load_encoder(config.model.text_model, config.model.trust_remote_code)
    emb = cached_item_embeddings(encoder, tokenizer, prepared.item_texts, config.model.pooling,
                                 resolve_text_model(config.model.text_model), config.data.resolved_cache_dir,
                                 max_length=config.data.item_text_tokens)
    return emb.numpy()


def parse_grid(text: str) -> list[list[str]]:
    """'model.dropout=0.2|0.5,train.lr=0.001|0.003' -> the product of the values as lists of --set overrides,
    in order (the first point first: ties keep it)."""
    axes = []
    for part in [p for p in text.split(",") if p.strip()]:
        key, sep, values = part.partition("=")
        choices = [v for v in values.split("|") if v]
        if not sep or not key.strip() or not choices:
            raise UserError(f"--our-grid part {part!r} must look like KEY=V1|V2, e.g. {OUR_GRID!r}.")
        axes.append([f"{key.strip()}={v}" for v in choices])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def parse_ablation(text: str) -> tuple[str, list[str]]:
    if ":" not in text or "=" not in text:
        raise UserError(f"--ablation {text!r} must look like NAME:KEY=VALUE[,KEY=VALUE], "
                        f"e.g. no-moddrop:model.modality_dropout=0")
    name, sets = text.split(":", 1)
    return name, [s for s in sets.split(",") if s]


def seed_config(args, seed: int, sets: list[str] = ()):
    """Our config for one seed: the cohort draw and training seed, plus --set and the row's overrides."""
    seeded = list(args.sets) + [f"data.split_seed={seed}", f"train.seed={seed}", f"output={args.out}/seed{seed}"]
    if args.fast:
        seeded += ["train.epochs=1", "train.max_steps_per_epoch=20"]
    return load_config(args.config, seeded + list(sets))


_PREPARED: dict[tuple, tuple] = {}


def prepared_seed(args, seed: int):
    """(config, prepared data) of a seed, built once per process (every row of a seed reads the same split)."""
    key = (args.data, args.format, seed)
    if key not in _PREPARED:
        config = seed_config(args, seed)
        _PREPARED[key] = (config, prepare_data(config, load_frames(config.data.path)))
    return _PREPARED[key]


def baseline_rows(args, seed: int, chosen: dict[str, dict]) -> tuple[dict, dict]:
    """Every baseline on one seed. `chosen` holds the baselines' hyper-parameters picked on the first seed's
    validation split ({} on the first seed); later seeds reuse them (one-point grids) to keep SASRec's grid
    within budget. Returns (rows, the hyper-parameters chosen here)."""
    config, prepared = prepared_seed(args, seed)
    print(f"seed {seed}: {json.dumps(prepared.split.stats)}", flush=True)
    names = [n for n in args.baselines.split(",") if n]
    emb = item_text_embeddings(config, prepared) if {"text", "ease_text", "sasrec_text"} & set(names) else None
    # ease_text takes lam from this seed's EASE row (itself fixed), so only beta is carried over.
    fixed = {n: {k: [v] for k, v in p.items() if not (n == "ease_text" and k == "lam")}
             for n, p in chosen.items() if n not in ("popularity", "text")}
    if "sasrec" not in chosen and not args.fast:
        fixed["sasrec"] = SASREC_BENCH_GRID
    results = run_baselines(prepared.split, emb, names, seed=seed, fast=args.fast, num_threads=1,
                            grids=fixed or None)
    rows = {}
    for name, r in results.items():
        rows[name] = {"val": flatten(r["val"], "val/"), "test": flatten(r["test"], "test/"),
                      "params": r["params"], "seconds": r["tune_seconds"] + 0.0, "fit_seconds": r["fit_seconds"],
                      "test_ranks": r["test_ranks"].tolist()}
        print(_result_line(seed, name, rows[name]) + f" params {r['params']}", flush=True)
    return rows, {name: dict(r["params"]) for name, r in results.items()}


def our_row(args, seed: int, label: str, sets: list[str]) -> dict:
    """One of our rows on one seed: configs/accuracy.yaml (or --config) with the row's overrides."""
    _, prepared = prepared_seed(args, seed)
    print(f"  seed {seed}: training {label} ...", flush=True)
    row = train_ours(seed_config(args, seed, sets), prepared, args.trainer, prefix=f"[seed {seed} {label}] ")
    row["overrides"] = list(sets)
    print(_result_line(seed, label, row), flush=True)
    return row


def _result_line(seed: int, label: str, row: dict) -> str:
    return (f"  seed {seed} {label}: test ndcg@10 {row['test']['test/overall/ndcg@10']:.4f} "
            f"cohort {row['test'].get('test/cohort/ndcg@10', float('nan')):.4f} ({row['seconds']:.0f}s)")


def check_row_configs(args) -> None:
    """Build every row's config at every grid point: a bad --set, --ablation or grid key, or a text model folder
    that is not there, fails now, not after the fits before it."""
    points = our_grid_points(args)
    for _, sets in our_rows_wanted(args):
        for point in points:
            text_model = seed_config(args, 0, sets + point).model.text_model
            if text_model:                      # empty: the packaged MiniLM, checked where a row reads text
                resolve_text_model(text_model)


def our_grid_points(args) -> list[list[str]]:
    """--our-grid's points (override lists); one empty point when there is nothing to search or no row of ours."""
    return parse_grid(args.our_grid) if our_rows_wanted(args) else [[]]


def our_rows_wanted(args) -> list[tuple[str, list[str]]]:
    rows = [(f"ours:{v}", [f"model.variant={v}"]) for v in args.variants.split(",") if v]
    # An ablation row is the config's model (fused unless the overrides set model.variant) with overrides.
    return rows + [(f"ours:{name}", sets) for name, sets in map(parse_ablation, args.ablation)]


def _compute(kind: str, args, seed: int, payload):
    """One unit of work: a seed's baselines (payload: the hyper-parameters they reuse; returns (rows, chosen)),
    or one of our rows (payload: (label, overrides); returns {label: row})."""
    if kind == "baselines":
        return baseline_rows(args, seed, payload)
    label, sets = payload
    return {label: our_row(args, seed, label, sets)}


def _job(kind: str, args, seed: int, payload, threads: int):
    """`_compute` in a pool process of `threads` torch threads."""
    torch.set_num_threads(threads)
    keep_freed_memory()           # the baselines (SASRec) gain from it as much as our models
    return _compute(kind, args, seed, payload)


def job_identity(kind: str, args, payload):
    """What a job is, for FinishedJobs: our fit by its label and overrides; a seed's baselines by which ones run
    and the hyper-parameters they reuse from the first seed."""
    if kind == "baselines":
        return {"baselines": [n for n in args.baselines.split(",") if n], "reused": payload}
    return list(payload)


def stored_result(store: FinishedJobs | None, kind: str, args, seed: int, payload):
    """A job's result from an earlier run, printed as if it had just run; None when not stored (or --fresh)."""
    result = store.get(kind, seed, job_identity(kind, args, payload)) if store else None
    if result is not None:
        rows = result[0] if kind == "baselines" else result
        for label, row in rows.items():
            print(_result_line(seed, label, row) + " [finished in an earlier run]", flush=True)
    return result


def keep_result(store: FinishedJobs | None, kind: str, args, seed: int, payload, result) -> None:
    if store is not None:
        store.put(kind, seed, job_identity(kind, args, payload), result)


def _grid_label(point: list[str]) -> str:
    return "ours:fused[" + ",".join(point) + "]"


def choose_our_point(grid_rows: dict[str, dict], points: list[list[str]]) -> list[str]:
    """The grid point whose fused fit on the first seed has the best validation NDCG@10 (ties: the earlier)."""
    scores = [grid_rows[_grid_label(p)]["val"]["val/overall/ndcg@10"] for p in points]
    return points[int(np.argmax(scores))]


def run_all(args, store: FinishedJobs | None = None) -> tuple[list[dict], dict]:
    """Rows of every seed: {row: {'val', 'test', 'seconds', ...}} per seed, baselines first in each; and the
    choices made on validation ({'grid': {label: validation NDCG@10}, 'chosen': overrides}).

    First seed first: the baselines tune their grids on it and the fused model is fitted at every point of
    --our-grid on it; later seeds and our other rows reuse those choices. With --jobs N > 1 the fits run side by
    side in N processes of cores // N torch threads each (a seed's baselines are one job; each of our fits is
    one). `store`: where each finished job is saved, and read back when resuming."""
    seeds = list(range(args.seeds))
    names = [n for n in args.baselines.split(",") if n]
    ours = our_rows_wanted(args)
    points = our_grid_points(args)
    searched = len(points) > 1
    grid_jobs = [(_grid_label(p), ["model.variant=fused"] + p) for p in points] if searched else []
    per_seed: list[dict] = [{} for _ in seeds]
    results: dict = {}
    chosen: dict[str, dict] = {}
    choice: dict = {"grid": {}, "chosen": points[0]}

    def later_jobs(point: list[str]) -> list[tuple[str, int, tuple]]:
        """Every fit of ours left once the grid point is known (the grid's own fused fit on seed 0 is reused)."""
        jobs = []
        for seed in seeds:
            for label, sets in ours:
                if searched and seed == 0 and label == "ours:fused" and sets == ["model.variant=fused"]:
                    continue
                jobs.append((label, seed, (label, sets + point)))
        return jobs

    def finish_grid() -> list[str]:
        grid_rows = {label: results.pop((label, 0))[label] for label, _ in grid_jobs}
        point = choose_our_point(grid_rows, points)
        choice.update(grid={label: row["val"]["val/overall/ndcg@10"] for label, row in grid_rows.items()},
                      chosen=point)
        print(f"our grid on seed 0 (validation NDCG@10): {json.dumps(choice['grid'])} -> {point}", flush=True)
        if ("ours:fused", ["model.variant=fused"]) in ours:
            results[("ours:fused", 0)] = {"ours:fused": grid_rows[_grid_label(point)]}
        return point

    def run_here(kind: str, seed: int, payload):
        result = stored_result(store, kind, args, seed, payload)
        if result is None:
            result = _compute(kind, args, seed, payload)
            keep_result(store, kind, args, seed, payload, result)
        return result

    if args.jobs <= 1:
        for seed in seeds:
            if names:
                rows, picked = run_here("baselines", seed, dict(chosen))
                results[("baselines", seed)] = rows
                for name, params in picked.items():
                    chosen.setdefault(name, params)
            if seed == 0:
                for label, sets in grid_jobs:
                    results[(label, 0)] = run_here("ours", 0, (label, sets))
                point = finish_grid() if searched else points[0]
            for label, job_seed, payload in later_jobs(point):
                if job_seed == seed:
                    results[(label, seed)] = run_here("ours", seed, payload)
    else:
        _run_parallel(args, seeds, names, grid_jobs, later_jobs, finish_grid, searched, points, results, store)
    for seed in seeds:                                  # the table's row order: baselines, then ours
        per_seed[seed].update(results.get(("baselines", seed), {}))
        for label, _ in ours:
            per_seed[seed].update(results[(label, seed)])
    return per_seed, choice


def baselines_first(jobs: list[tuple]) -> list[tuple]:
    """The order in which waiting jobs (kind, ...) go to free processes: a seed's baselines (SASRec's fit, the
    longest job) before our fits, each kind in submission order. The pool's own queue is first come, first served,
    and the later seeds' baselines can only be queued once the first seed's have chosen their grids, after our
    fits: run last, they left one process idle through the final SASRec fit. Measured, the order made neither dev
    set's run shorter (docs/ACCURACY.md, "The bench's time"); it only removes that idle tail."""
    return sorted(jobs, key=lambda job: job[0] != "baselines")


def threads_per_fit(args) -> int:
    """Torch threads each fit gets: cores // --jobs in the pool's processes, this process's own with --jobs 1."""
    return max(1, available_cores() // args.jobs) if args.jobs > 1 else torch.get_num_threads()


def available_cores() -> int:
    """The cores this process may use (a container's affinity), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def _run_parallel(args, seeds, names, grid_jobs, later_jobs, finish_grid, searched, points, results,
                  store: FinishedJobs | None = None) -> None:
    """run_all's schedule on a process pool: seed 0's baselines and grid fits first, then everything that
    depends on their choices. A job found in `store` is not run: its result counts as just finished."""
    threads = threads_per_fit(args)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {}
        waiting: list[tuple[str, int, object, str]] = []    # handed to the pool only as its processes free up
        grid_left = [len(grid_jobs)]

        def submit(kind: str, seed: int, payload, key: str) -> None:
            result = stored_result(store, kind, args, seed, payload)
            if result is None:
                waiting.append((kind, seed, payload, key))
            else:
                finished(key, seed, result)

        def finished(key: str, seed: int, result) -> None:
            """A job's result is in: keep it, and queue the jobs that were waiting for its choices."""
            if key == "baselines":
                result, picked = result
                if seed == 0:
                    for later in seeds[1:]:
                        submit("baselines", later, picked, "baselines")
            results[(key, seed)] = result
            if key.startswith("ours:fused[") and searched:
                grid_left[0] -= 1
                if grid_left[0] == 0:
                    for label, job_seed, payload in later_jobs(finish_grid()):
                        submit("ours", job_seed, payload, label)

        def start_free() -> None:
            waiting[:] = baselines_first(waiting)
            while waiting and len(pending) < args.jobs:
                kind, seed, payload, key = waiting.pop(0)
                pending[pool.submit(_job, kind, args, seed, payload, threads)] = (kind, seed, payload, key)

        for label, sets in grid_jobs:
            submit("ours", 0, (label, sets), label)
        if names:
            submit("baselines", 0, {}, "baselines")
        if not searched:
            for label, seed, payload in later_jobs(points[0]):
                submit("ours", seed, payload, label)
        start_free()
        failure: BaseException | None = None
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, seed, payload, key = pending.pop(future)
                if future.exception() is not None:
                    # The run cannot complete: start nothing more, but let the running jobs finish and be saved,
                    # so that the same command runs only what is left.
                    if failure is None:
                        print(f"a job failed ({kind}, seed {seed}); stopping after the {len(pending)} running "
                              f"job(s) finish and are saved", flush=True)
                    failure = failure or future.exception()
                    waiting.clear()
                    continue
                result = future.result()
                keep_result(store, kind, args, seed, payload, result)
                if failure is None:
                    finished(key, seed, result)
            if failure is None:
                start_free()
        if failure is not None:
            raise failure


def aggregate(per_seed: list[dict]) -> dict[str, dict]:
    """{row: {metric: (mean, std)}} over seeds, for test and val metrics and seconds."""
    out: dict[str, dict] = {}
    for row in per_seed[0]:
        metrics: dict[str, tuple[float, float]] = {}
        for stage in ("val", "test"):
            for key in per_seed[0][row][stage]:
                values = [s[row][stage][key] for s in per_seed if key in s[row][stage]]
                metrics[key] = (float(np.mean(values)), float(np.std(values)))
        secs = [s[row]["seconds"] for s in per_seed]
        metrics["seconds"] = (float(np.mean(secs)), float(np.std(secs)))
        out[row] = metrics
    return out


def markdown_table(agg: dict[str, dict], metric: str = "ndcg@10", stage: str = "test") -> str:
    groups = [g for g in GROUPS if any(f"{stage}/{g}/{metric}" in m for m in agg.values())]
    header = "| model | " + " | ".join(groups) + " | seconds/seed |"
    lines = [header, "|" + "---|" * (len(groups) + 2)]
    best = {g: max(m.get(f"{stage}/{g}/{metric}", (-1, 0))[0] for m in agg.values()) for g in groups}
    for row, m in agg.items():
        cells = []
        for g in groups:
            mean, std = m.get(f"{stage}/{g}/{metric}", (float("nan"), 0.0))
            cell = f"{mean:.4f} ± {std:.4f}"
            cells.append(f"**{cell}**" if mean == best[g] else cell)
        lines.append(f"| {ROW_LABELS.get(row, row)} | " + " | ".join(cells) + f" | {m['seconds'][0]:.0f} |")
    return "\n".join(lines)


def paired_bootstrap(per_seed: list[dict], ours: str, other: str, group: str, draws: int = 2000,
                     seed: int = 0) -> dict[str, float] | None:
    """Per-user test NDCG@10 of `ours` against `other` on the same users, pooled over seeds: the ratio of the
    means and the mean difference, each with a 95% interval from resampling users within each seed (the seeds'
    cohort draws kept). Says whether a gap in the table is larger than the noise of a few hundred users.
    None when a row lacks per-user ranks (older JSON)."""
    rng = np.random.default_rng(seed)
    ours_sum, other_sum, count = np.zeros(draws), np.zeros(draws), 0
    point_ours = point_other = 0.0
    for rows in per_seed:
        if "test_ranks" not in rows.get(ours, {}) or "test_ranks" not in rows.get(other, {}):
            return None
        k = np.asarray(rows[ours]["test_cohort_k"])
        members = {"overall": np.ones(len(k), bool), "warm": k == 0, "cohort": k > 0}[group]
        a = user_ndcg(rows[ours]["test_ranks"])[members]
        b = user_ndcg(rows[other]["test_ranks"])[members]
        pick = rng.integers(0, len(a), size=(draws, len(a)))
        ours_sum += a[pick].sum(1)
        other_sum += b[pick].sum(1)
        point_ours, point_other, count = point_ours + a.sum(), point_other + b.sum(), count + len(a)
    ratio = ours_sum / np.maximum(other_sum, 1e-12)
    diff = (ours_sum - other_sum) / count
    return {"ratio": point_ours / max(point_other, 1e-12), "ratio_lo": float(np.percentile(ratio, 2.5)),
            "ratio_hi": float(np.percentile(ratio, 97.5)), "diff": (point_ours - point_other) / count,
            "diff_lo": float(np.percentile(diff, 2.5)), "diff_hi": float(np.percentile(diff, 97.5)),
            "users": count}


GOALS_VS_SASREC = (("cohort", 1.20), ("overall", 1.10))


def goal_lines(agg: dict[str, dict], per_seed: list[dict] | None = None) -> list[str]:
    """The accuracy goals on the test split (means over seeds), each with the paired 95% interval when per-user
    ranks are at hand: fused vs SASRec (a goal is MET when the ratio reaches it and the interval's lower end is
    at least 1); fused vs the best order-free baseline in every cohort bucket; and what text and DMF each add."""
    fused = agg.get("ours:fused")
    if fused is None:
        return []
    lines = []
    if "sasrec" in agg:
        for group, need in GOALS_VS_SASREC:
            key = f"test/{group}/ndcg@10"
            s, f = agg["sasrec"][key][0], fused[key][0]
            ratio = f / s if s else float("inf")
            test = paired_bootstrap(per_seed, "ours:fused", "sasrec", group) if per_seed else None
            met = ratio >= need and (test is None or test["ratio_lo"] >= 1.0)
            lines.append(f"- {group} vs SASRec: fused {f:.4f} vs {s:.4f} = {ratio:.2f}x (goal >= {need:.2f}x, "
                         f"interval above 1): {'MET' if met else 'NOT MET'}" + _interval_text(test))
    order_free = [r for r in ORDER_FREE if r in agg]
    if order_free:
        groups = [g for g in GROUPS if f"test/{g}/ndcg@10" in fused]
        below = []
        for g in groups:
            key = f"test/{g}/ndcg@10"
            best = max(order_free, key=lambda r: agg[r].get(key, (-1.0, 0))[0])
            if fused[key][0] < agg[best].get(key, (-1.0, 0))[0]:
                below.append(f"{g} ({ROW_LABELS[best]} {agg[best][key][0]:.4f} vs {fused[key][0]:.4f})")
        lines.append(f"- never below the best order-free baseline ({', '.join(ROW_LABELS[r] for r in order_free)}) "
                     f"in any bucket: {'MET' if not below else 'NOT MET: ' + '; '.join(below)}")
    for ours, other, what in (("ours:fused", "ours:dmf", "text's share (fused - ids+DMF)"),
                              ("ours:ids_text", "ours:ids", "text's share without DMF (ids+text - ids)"),
                              ("ours:fused", "ours:ids_text", "DMF's share (fused - ids+text)"),
                              ("ours:fused", "sasrec_text", "fused - (SASRec + the same text prior)")):
        if ours in agg and other in agg:
            for group in ("cohort", "overall"):
                key = f"test/{group}/ndcg@10"
                test = paired_bootstrap(per_seed, ours, other, group) if per_seed else None
                lines.append(f"- {what}, {group}: {agg[ours][key][0] - agg[other][key][0]:+.4f}"
                             + _interval_text(test))
    return lines


def text_prior_line(per_seed: list[dict]) -> str:
    """Which text prior (text_prior/text_prior_items and, when on, text_prior_form) each of our rows chose on each
    seed's validation; rows that never chose one (no text, or 0 every time) are left out."""
    shown = []
    for row in (per_seed[0] if per_seed else {}):
        values = [s[row].get("text_prior") for s in per_seed if row in s]
        if row.startswith("ours:") and any(v and v[0] for v in values):
            shown.append(f"{ROW_LABELS.get(row, row)}: " + ", ".join(_prior_text(v) for v in values if v))
    return ("\n\nText prior chosen on each seed's validation (text_prior/text_prior_items form): " + "; ".join(shown)
            if shown else "")


def _prior_text(choice: list) -> str:
    """[0.5, 8.0, 'max'] -> '0.5/8 max'; the form only when the prior is on (runs before the form: 2 values)."""
    form = f" {choice[2]}" if len(choice) > 2 and choice[0] else ""
    return f"{choice[0]:g}/{choice[1]:g}{form}"


def _interval_text(test: dict | None) -> str:
    if test is None:
        return ""
    return (f"; paired over {test['users']} user-seeds: ratio 95% interval [{test['ratio_lo']:.2f}, "
            f"{test['ratio_hi']:.2f}], difference {test['diff']:+.4f} [{test['diff_lo']:+.4f}, {test['diff_hi']:+.4f}]")


def chart(agg: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUPS if any(f"test/{g}/ndcg@10" in m for m in agg.values())]
    rows = list(agg)
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 4.5))
    for i, row in enumerate(rows):
        means = [agg[row].get(f"test/{g}/ndcg@10", (0, 0))[0] for g in groups]
        stds = [agg[row].get(f"test/{g}/ndcg@10", (0, 0))[1] for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, means, width, yerr=stds, label=ROW_LABELS.get(row, row),
               capsize=2)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels(groups)
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.set_title("Leave-one-out, full ranking, by sparsity cohort (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- time estimate ------------------------------------------------------------------------------------------
def planned_fits(args) -> tuple[int, int]:
    """(fits of ours, fits of SASRec) that run_all will run: the fused model at each grid point on the first
    seed (the chosen one is reused as that seed's fused row), every row of ours on every seed, and SASRec at each
    point of its grid on the first seed and once on each later seed."""
    ours = our_rows_wanted(args)
    points = our_grid_points(args)
    n_ours = args.seeds * len(ours)
    if len(points) > 1:
        n_ours += len(points) - (1 if ("ours:fused", ["model.variant=fused"]) in ours else 0)
    n_sasrec = 0
    if "sasrec" in [n for n in args.baselines.split(",") if n]:
        n_sasrec = SASREC_GRID_FITS + args.seeds - 1
    return n_ours, n_sasrec


def fits_left(args, finished: list[tuple[str, int, object]]) -> tuple[int, int]:
    """`planned_fits` less the fits of jobs already finished (FinishedJobs.matching(), when resuming): a fit of
    ours this run plans (a grid fit on the first seed, or a row of ours on one of its seeds), and the SASRec fits
    inside a finished seed's baselines (its grid's on the first seed, one on each later seed)."""
    n_ours, n_sasrec = planned_fits(args)
    ours = {label for label, _ in our_rows_wanted(args)}
    points = our_grid_points(args)
    grid = {_grid_label(p) for p in points} if len(points) > 1 else set()
    for kind, seed, job in finished:
        if seed >= args.seeds:
            continue
        if kind == "ours" and ((seed == 0 and job[0] in grid) or
                               (job[0] in ours and not (grid and seed == 0 and job[0] == "ours:fused"))):
            n_ours -= 1
        elif kind == "baselines" and "sasrec" in job["baselines"] and n_sasrec:
            n_sasrec -= SASREC_GRID_FITS if seed == 0 else 1
    return max(n_ours, 0), max(n_sasrec, 0)


def seconds_per_fit(args, threads: int, min_seconds: float = 8.0, max_steps: int = 50) -> dict:
    """Seconds of one fit of ours, measured before the run on `threads` torch threads: the fused model (the
    grid's first point) on the first seed's data takes one warm-up step, then steps until `min_seconds` have
    passed (3 to `max_steps` steps), and validates once. An epoch = the seconds per predicted target times the
    targets of an epoch; a fit = epochs x (epoch + validation). Full-softmax training costs (targets x
    catalogue) and validation (users x catalogue): what grows with a larger data set."""
    from raysparse.local import build_recommender, stage_metrics
    from raysparse.step import PlainStepper, steps_per_epoch

    _, prepared = prepared_seed(args, 0)
    config = seed_config(args, 0, ["model.variant=fused"] + our_grid_points(args)[0])
    tc = config.train
    # Built on every core: a new catalogue's item texts are encoded here, once, into the cache every fit reads.
    rec = build_recommender(config, prepared, config.data.resolved_cache_dir)
    examples = rec.builder.training_examples(tc.example_mode)
    steps = steps_per_epoch(len(examples[0]), tc.batch_size_per_worker, tc.max_steps_per_epoch)
    # A sequence batch predicts every next item of its windows (each transition once an epoch); the other
    # modes one target an example.
    lengths = prepared.split.history_lengths()
    targets = int(np.maximum(lengths - 1, 0).sum()) if tc.example_mode == "sequence" else len(examples[0])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stepper = PlainStepper(rec.model, tc, steps * tc.epochs)
        stepper.start_epoch()
        rng = np.random.default_rng(tc.seed)
        batches = itertools.chain.from_iterable(     # into the next epoch when an epoch has fewer steps
            rec.builder.iterate_epoch(tc.batch_size_per_worker, rng, tc.example_mode) for _ in itertools.count())
        stepper.step(next(batches))                                    # warm-up: first-call allocations
        timed_targets, n_steps, t0 = 0, 0, time.perf_counter()
        for batch in itertools.islice(batches, max_steps):
            stepper.step(batch)
            timed_targets += len(batch["target_pos"])
            n_steps += 1
            if n_steps >= 3 and time.perf_counter() - t0 >= min_seconds:
                break
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        stage_metrics(rec, prepared, "val")                            # after every epoch, as the fits do
        validation = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    epoch = elapsed / max(timed_targets, 1) * targets
    return {"fit_seconds": (epoch + validation) * tc.epochs, "epoch_seconds": epoch,
            "validation_seconds": validation, "epochs": tc.epochs, "steps": steps, "targets": targets,
            "items": prepared.split.n_items, "threads": threads, "timed_steps": n_steps,
            "early_stopping": tc.patience > 0}


def time_estimate(args, finished: list[tuple[str, int, object]] = ()) -> dict:
    """How long the run will take on this machine, from `seconds_per_fit` and `planned_fits`: the fits of ours
    and SASRec's (its full-softmax training costs about what ours does) over --jobs processes. The other
    baselines, tests and model builds come on top: on the dev sets (--seeds 3 --jobs 2) the whole run took
    1.05-1.21x this (Amazon Scientific: 23-29 min estimated, 26.0-30.9 min run; ML latest-small: 39-45 and 47.5-48.5).
    With early stopping it is an upper bound (Amazon Scientific since train.patience_z: 24 estimated, 22.1 run).
    `finished`: jobs an earlier run finished, reused by this one, whose fits are not counted."""
    fit = seconds_per_fit(args, threads_per_fit(args))
    n_ours, n_sasrec = fits_left(args, finished)
    fit["minutes"] = (n_ours + n_sasrec) * fit["fit_seconds"] / args.jobs / 60
    fit.update(ours_fits=n_ours, sasrec_fits=n_sasrec)
    return fit


def estimate_line(est: dict, jobs: int) -> str:
    at_most = " at most" if est.get("early_stopping") else ""     # fits that stop early take less
    return (f"time estimate: ~{est['minutes']:.0f} min{at_most}. A fit takes ~{est['fit_seconds'] / 60:.1f} "
            f"min{at_most} ({est['epochs']} epochs of {est['targets']:,} targets over {est['items']:,} items at "
            f"{est['epoch_seconds']:.1f} s + {est['validation_seconds']:.1f} s of validation, on "
            f"{est['threads']} thread(s), measured over {est['timed_steps']} steps); {est['ours_fits']} fits of "
            f"ours and {est['sasrec_fits']} of SASRec to run on {jobs} process(es). Cheaper: --seeds 1, --our-grid '', "
            f"--variants fused.")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: give the number of fits to run side by side, 1 or more.")
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give the number of seeds to average over, 1 or more (3 for the "
                        f"intervals the goals read).")
    if args.jobs > 1 and args.trainer == "ray":
        raise UserError(f"--jobs {args.jobs} runs fits in parallel processes, which --trainer ray does not "
                        f"(Ray Train takes the cores itself); use --jobs 1 with --trainer ray.")
    fmt = args.format or guess_format(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder, data_report = dataset_folder(args.data, fmt, args.on_bad_rows, str(out))
    set_aside = data_report.rows_quarantined if data_report else 0
    if set_aside:
        print(f"{set_aside:,} invalid interaction row(s) set aside in {data_report.quarantine_path} "
              f"(--on-bad-rows quarantine):\n{data_report.summary()}", flush=True)
    given_sets = list(args.sets) + [f"data.format={fmt}"] + (
        [f"data.on_bad_rows={args.on_bad_rows}"] if args.on_bad_rows != "fail" else [])
    # Every fit (and each Ray worker) reads the dataset folder itself; the split depends only on the seeds.
    args.sets = list(args.sets) + [f"data.path={Path(folder).resolve()}"]
    if args.trainer == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    keep_freed_memory()           # before any fit in this process, baselines included (see its docstring)
    check_row_configs(args)
    # The data as given (a converted layout lands in a new temporary folder each run), the --set overrides as
    # given, the threads each fit will get.
    try:
        text_model = resolve_text_model(seed_config(args, 0).model.text_model)
    except UserError:                   # no packaged MiniLM: only rows without text can run, and they say so
        text_model = ""
    fingerprint = run_fingerprint(args.config, given_sets, args.data, args.fast, args.trainer, threads_per_fit(args),
                                  text_model)
    store = FinishedJobs(out / "finished", fingerprint, resume=not args.fresh)
    finished = store.matching()
    found = len(finished)
    if found and not args.fresh:
        print(f"resuming: {found} finished job(s) of a run with this code, config, data and these flags are in "
              f"{store.folder}; they are reused, the others run (--fresh runs every job again)", flush=True)
    elif found:
        print(f"--fresh: the {found} finished job(s) of a run with this code, config, data and these flags in "
              f"{store.folder} are not reused; every job runs again", flush=True)
    print(f"each job is saved to {store.folder} as it ends: if this run stops, the same command runs only the "
          f"jobs left", flush=True)
    # Said once here and kept in accuracy.md: on an unseen catalogue the shared text template may match no column.
    text_note = prepared_seed(args, 0)[1].item_text_note
    if text_note:
        print(text_note, flush=True)
    estimate = None
    if not args.fast and our_rows_wanted(args):
        # Measured before the fits: on a larger data set than the dev sets the run can take hours (full-softmax
        # training costs targets x catalogue), and the one running it should know that now, not at the end.
        estimate = time_estimate(args, () if args.fresh else finished)
        print(estimate_line(estimate, args.jobs), flush=True)
    if args.jobs > 1:
        _PREPARED.clear()         # the fits run in other processes; do not hold the split here meanwhile
    per_seed, choice = run_all(args, store)
    agg = aggregate(per_seed)
    wall = time.perf_counter() - t0
    ndcg = markdown_table(agg, "ndcg@10")
    hr = markdown_table(agg, "hr@10")
    goals = goal_lines(agg, per_seed)
    text = (f"## Test NDCG@10 (full ranking, mean ± std over {args.seeds} seeds)\n\n{ndcg}\n\n"
            f"## Test HR@10\n\n{hr}\n\n## Goals\n\n" + "\n".join(goals) +
            f"\n\nChosen on the first seed's validation for our rows: {choice['chosen'] or 'nothing to choose'}"
            + (f" (fused validation NDCG@10 by grid point: {json.dumps(choice['grid'])})" if choice["grid"] else "") +
            text_prior_line(per_seed) + (f"\n\n{text_note[0].upper()}{text_note[1:]}" if text_note else "") +
            f"\n\nWall time: {wall / 60:.1f} min on this machine"
            + (f" (estimated at the start: {estimate['minutes']:.0f} min)" if estimate else "")
            + (f"; {store.reused} job(s) finished in an earlier run and reused (their seconds are their own; "
               f"--fresh runs every job)" if store.reused else "")
            + f"; data: {args.data} ({fmt or 'standard schema'}"
            + (f"; {set_aside:,} invalid interaction rows set aside in {data_report.quarantine_path}" if set_aside
               else "") + "); "
            f"trainer: {args.trainer}; command: raysparse bench accuracy --seeds {args.seeds}"
            + (f" --jobs {args.jobs}" if args.jobs > 1 else "") + (" --fast" if args.fast else "")
            + (" --fresh" if args.fresh else "")
            + (f" --on-bad-rows {args.on_bad_rows}" if args.on_bad_rows != "fail" else "") + "\n")
    print("\n" + text)
    (out / "accuracy.md").write_text(text)
    (out / "accuracy.json").write_text(json.dumps({"per_seed": per_seed, "aggregate": agg, "wall_seconds": wall,
                                                   "time_estimate": estimate, "our_choice": choice,
                                                   "args": vars(args) | {"func": None}}, indent=1, default=str))
    chart(agg, out / "accuracy.png")
    print(f"wrote {out / 'accuracy.md'}, {out / 'accuracy.json'}, {out / 'accuracy.png'}")
    return 0
