"""`raysparse bench step`: plain (one process, torch AdamW) train-step throughput of the fused model with the
pretrained MiniLM text tower on ML latest-small, per fine-tuning mode, side by side in one run."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from raysparse.bench.common import DEFAULT_ML, guess_format, load_frames, print_table
from raysparse.build import prepare_data
from raysparse.config import config_from_dict
from raysparse.local import build_recommender
from raysparse.step import compute_loss, param_groups


def register_bench(subparsers) -> None:
    p = subparsers.add_parser("step", help="Plain train-step examples/s (MiniLM + DMF on ML latest-small).")
    p.add_argument("--data", default=str(DEFAULT_ML), help="Dataset folder (standard schema or MovieLens).")
    p.add_argument("--format", default="", help="Layout of --data (movielens-latest, movielens-1m, movielens-100k, "
                                                "amazon-json); guessed when empty.")
    p.add_argument("--modes", default="frozen,top,full", help="Fine-tuning modes to compare.")
    p.add_argument("--steps", type=int, default=20, help="Timed steps per mode (after 3 warm-up steps).")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--text-model", default="", help="Encoder folder; empty = packaged all-MiniLM-L6-v2.")
    p.add_argument("--output", default="runs/bench-step")
    p.set_defaults(func=run)


def measure(config, prepared, steps: int, warmup: int = 3) -> dict:
    rec = build_recommender(config, prepared, f"{config.output}/cache")
    model, builder = rec.model.train(), rec.builder
    optimizer = torch.optim.AdamW(param_groups(model, config.train), foreach=True)
    batches = builder.iterate_epoch(config.train.batch_size_per_worker, np.random.default_rng(0))
    collate_s = compute_s = 0.0
    examples = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        loss = compute_loss(model(batch), config.train.loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= warmup:
            collate_s += t1 - t0
            compute_s += t2 - t1
            examples += len(batch["user_idx"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"examples_per_s": examples / (collate_s + compute_s), "collate_ms_per_step": 1e3 * collate_s / steps,
            "compute_ms_per_step": 1e3 * compute_s / steps, "trainable_params": trainable}


def run(args: argparse.Namespace) -> int:
    frames = load_frames(args.data, args.format or guess_format(args.data))
    rows = []
    prepared = None
    for mode in args.modes.split(","):
        config = config_from_dict({
            "output": args.output,
            "data": {"max_length": args.max_length},
            "model": {"variant": "fused", "finetune": mode, "text_model": args.text_model},
            "train": {"batch_size_per_worker": args.batch_size}})
        prepared = prepared or prepare_data(config, frames)
        result = measure(config, prepared, args.steps)
        rows.append({"finetune": mode, "batch": args.batch_size, "max_length": args.max_length, **result})
    print(f"\nbench step: {prepared.split.stats['train_interactions']} training interactions, "
          f"{torch.get_num_threads()} torch threads")
    print_table(rows)
    return 0
