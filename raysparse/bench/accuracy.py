"""`raysparse bench accuracy`: every model on the last-item protocol, side by side, over several seeds.

Rows: popularity, EASE, iALS, SASRec, the zero-shot text baselines (text, EASE + text), and our DMF-only,
text-only and fused models (plus any `--ablation`). Each seed re-draws the sparse cohort (data.split_seed)
and re-seeds training. Baselines are tuned on validation only (raysparse.bench.baselines); our models pick
their epoch by validation NDCG@10 and their configuration comes from configs/accuracy.yaml, chosen on
validation (docs/ACCURACY.md lists the ablations). The test split decides nothing.

Our models train through the same code as `raysparse train`: on local Ray (Ray Train + DeepSpeed, one
worker) with `--trainer ray`, or in-process with `--trainer local` (same model, step and data code).
Output: a markdown table (mean ± std over seeds), JSON with every number, and a PNG chart by cohort.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from raysparse.bench.common import DEFAULT_ML, dataset_folder, guess_format, load_frames

ACCURACY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accuracy.yaml"
BASELINE_NAMES = ["popularity", "ease", "ials", "text", "ease_text", "sasrec"]
OUR_VARIANTS = ["dmf", "text", "fused"]
ROW_LABELS = {"popularity": "Popularity", "ease": "EASE", "ials": "iALS", "text": "Text zero-shot",
              "ease_text": "EASE + text", "sasrec": "SASRec", "ours:dmf": "DMF-only (ours)",
              "ours:text": "Text-only (ours)", "ours:fused": "Fused (ours)"}
# SASRec's grid on the first seed: 2 layers, 64 hidden (the best of a wider grid run once on ML latest-small),
# dropout searched; a fuller grid costs ~2 min per configuration on 2 cores.
SASREC_BENCH_GRID = {"hidden_size": [64], "num_layers": [2], "dropout": [0.2, 0.5]}
GROUPS = ["overall", "warm", "cohort", "cohort_k1", "cohort_k2", "cohort_k3", "cohort_k5"]


def register_bench(subparsers) -> None:
    p = subparsers.add_parser("accuracy", help="Fused vs DMF vs text vs tuned baselines by sparsity cohort.")
    p.add_argument("--data", default=str(DEFAULT_ML), help="Dataset folder (standard schema or MovieLens).")
    p.add_argument("--format", default="", help="MovieLens layout of --data; guessed when empty.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds (cohort draw + training) to average over.")
    p.add_argument("--config", default=str(ACCURACY_CONFIG), help="Config of our models.")
    p.add_argument("--set", dest="sets", action="append", default=[], help="Config override for our models.")
    p.add_argument("--baselines", default=",".join(BASELINE_NAMES), help="Baselines to run ('' = none).")
    p.add_argument("--variants", default=",".join(OUR_VARIANTS), help="Our variants to run ('' = none).")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="An extra row of ours with config overrides, e.g. 'no-moddrop:model.modality_dropout=0' "
                        "or 'bag-dmf:model.history_encoder=bag,train.example_mode=prefix,model.variant=dmf'.")
    p.add_argument("--trainer", choices=["ray", "local"], default="ray",
                   help="ray: Ray Train + DeepSpeed on local Ray (1 worker); local: in-process loop.")
    p.add_argument("--fast", action="store_true", help="Small grids and few epochs (smoke runs, tests).")
    p.add_argument("--out", default="runs/accuracy", help="Where the table, JSON and chart go.")
    p.set_defaults(func=run)


# ---- running ------------------------------------------------------------------------------------------------
def train_ours(config, prepared, trainer: str) -> dict:
    """Train one of our variants; returns {'val','test' (flat metrics), 'seconds', 'best_epoch'}."""
    t0 = time.perf_counter()
    if trainer == "ray":
        from raysparse.ray_train import run_ray_training

        summary = run_ray_training(config, log=lambda m: print(f"    {m}", flush=True))
    else:
        from raysparse.local import run_local

        _, summary = run_local(config, prepared, log=lambda m: print(f"    {m}", flush=True), save=False)
    return {"val": summary["val"], "test": summary["test"], "best_epoch": summary.get("best_epoch"),
            "seconds": time.perf_counter() - t0}


def item_text_embeddings(config, prepared) -> np.ndarray:
    """Frozen-encoder embedding of each item's text (the same cached table our text tower reads)."""
    from raysparse.model.text import cached_item_embeddings, load_encoder, resolve_text_model

    encoder, tokenizer = load_encoder(config.model.text_model, config.model.trust_remote_code)
    emb = cached_item_embeddings(encoder, tokenizer, prepared.item_texts, config.model.pooling,
                                 resolve_text_model(config.model.text_model), config.data.resolved_cache_dir)
    return emb.numpy()


def parse_ablation(text: str) -> tuple[str, list[str]]:
    from raysparse.errors import UserError

    if ":" not in text or "=" not in text:
        raise UserError(f"--ablation {text!r} must look like NAME:KEY=VALUE[,KEY=VALUE], "
                        f"e.g. no-moddrop:model.modality_dropout=0")
    name, sets = text.split(":", 1)
    return name, [s for s in sets.split(",") if s]


def run_seed(seed: int, args, frames, base_sets: list[str], chosen: dict[str, dict]) -> dict:
    """One seed: every baseline and variant. `chosen` holds the baselines' hyper-parameters picked on the first
    seed's validation split; later seeds reuse them (one-point grids) to keep SASRec's grid within budget."""
    from raysparse.bench.baselines import run_baselines
    from raysparse.build import prepare_data
    from raysparse.config import load_config
    from raysparse.metrics import flatten

    seeded = base_sets + [f"data.split_seed={seed}", f"train.seed={seed}", f"output={args.out}/seed{seed}"]
    if args.fast:
        seeded += ["train.epochs=1", "train.max_steps_per_epoch=20"]
    config = load_config(args.config, seeded)
    prepared = prepare_data(config, frames)
    print(f"seed {seed}: {json.dumps(prepared.split.stats)}", flush=True)
    rows: dict[str, dict] = {}
    names = [n for n in args.baselines.split(",") if n]
    if names:
        emb = item_text_embeddings(config, prepared) if {"text", "ease_text"} & set(names) else None
        t0 = time.perf_counter()
        # ease_text takes lam from this seed's EASE row (itself fixed), so only beta is carried over.
        fixed = {n: {k: [v] for k, v in p.items() if not (n == "ease_text" and k == "lam")}
                 for n, p in chosen.items() if n not in ("popularity", "text")}
        if "sasrec" not in chosen and not args.fast:
            fixed["sasrec"] = SASREC_BENCH_GRID
        results = run_baselines(prepared.split, emb, names, seed=seed, fast=args.fast, num_threads=1,
                                grids=fixed or None)
        for name, r in results.items():
            chosen.setdefault(name, dict(r["params"]))
        for name, r in results.items():
            rows[name] = {"val": flatten(r["val"], "val/"), "test": flatten(r["test"], "test/"),
                          "params": r["params"], "seconds": r["tune_seconds"] + 0.0,
                          "fit_seconds": r["fit_seconds"]}
            print(f"  {name}: test ndcg@10 {rows[name]['test']['test/overall/ndcg@10']:.4f} "
                  f"cohort {rows[name]['test'].get('test/cohort/ndcg@10', float('nan')):.4f} "
                  f"({r['tune_seconds']:.0f}s) params {r['params']}", flush=True)
    variants = [(f"ours:{v}", [f"model.variant={v}"]) for v in args.variants.split(",") if v]
    # An ablation row is the config's model (fused unless the overrides set model.variant) with overrides.
    variants += [(f"ours:{name}", sets) for name, sets in map(parse_ablation, args.ablation)]
    for label, sets in variants:
        cfg = load_config(args.config, seeded + sets)
        print(f"  training {label} ...", flush=True)
        rows[label] = train_ours(cfg, prepared, args.trainer)
        print(f"  {label}: test ndcg@10 {rows[label]['test']['test/overall/ndcg@10']:.4f} "
              f"cohort {rows[label]['test'].get('test/cohort/ndcg@10', float('nan')):.4f} "
              f"({rows[label]['seconds']:.0f}s)", flush=True)
    return rows


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


def goal_lines(agg: dict[str, dict]) -> list[str]:
    """The issue's goals, stated against the best baseline on the test split (means over seeds)."""
    baselines = {r: m for r, m in agg.items() if not r.startswith("ours:")}
    fused = agg.get("ours:fused")
    if not baselines or fused is None:
        return []
    lines = []
    for group, need in (("cohort", 1.20), ("overall", 1.00)):
        key = f"test/{group}/ndcg@10"
        best_row = max(baselines, key=lambda r: baselines[r][key][0])
        base, ours = baselines[best_row][key][0], fused[key][0]
        ratio = ours / base if base else float("inf")
        verdict = "MET" if ratio >= need else "NOT MET"
        lines.append(f"- {group}: fused NDCG@10 {ours:.4f} vs best baseline {ROW_LABELS.get(best_row, best_row)} "
                     f"{base:.4f} = {ratio:.2f}x (goal >= {need:.2f}x): {verdict}")
    if "sasrec" in baselines:
        for group in ("cohort", "overall"):
            key = f"test/{group}/ndcg@10"
            s, f = baselines["sasrec"][key][0], fused[key][0]
            lines.append(f"- {group} vs SASRec: fused {f:.4f} vs SASRec {s:.4f} ({'ahead' if f > s else 'behind'})")
    return lines


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
    ax.set_title("Last-item protocol by sparsity cohort (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    fmt = args.format or guess_format(args.data)
    folder = dataset_folder(args.data, fmt)
    frames = load_frames(folder)
    # Ray workers read the dataset folder themselves (same split: it depends only on the config's seeds).
    args.sets = list(args.sets) + [f"data.path={Path(folder).resolve()}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trainer == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    chosen: dict[str, dict] = {}
    per_seed = [run_seed(seed, args, frames, list(args.sets), chosen) for seed in range(args.seeds)]
    agg = aggregate(per_seed)
    wall = time.perf_counter() - t0
    ndcg = markdown_table(agg, "ndcg@10")
    hr = markdown_table(agg, "hr@10")
    goals = goal_lines(agg)
    text = (f"## Test NDCG@10 (full ranking, mean ± std over {args.seeds} seeds)\n\n{ndcg}\n\n"
            f"## Test HR@10\n\n{hr}\n\n## Goals\n\n" + "\n".join(goals) +
            f"\n\nWall time: {wall / 60:.1f} min on this machine; data: {args.data} ({fmt or 'standard schema'}); "
            f"trainer: {args.trainer}; command: raysparse bench accuracy --seeds {args.seeds}"
            + (" --fast" if args.fast else "") + "\n")
    print("\n" + text)
    (out / "accuracy.md").write_text(text)
    (out / "accuracy.json").write_text(json.dumps({"per_seed": per_seed, "aggregate": agg, "wall_seconds": wall,
                                                   "args": vars(args) | {"func": None}}, indent=1, default=str))
    chart(agg, out / "accuracy.png")
    print(f"wrote {out / 'accuracy.md'}, {out / 'accuracy.json'}, {out / 'accuracy.png'}")
    return 0
