"""`raysparse bench train` and `raysparse bench gpu`.

bench train: steady-state training examples/s of one model on one dataset through the plain loop
(`raysparse.loop.train_local`, one process, torch AdamW), Ray Train + DeepSpeed with 1 worker and with 2
workers, measured side by side in one run and printed as one table. Every path runs the one epoch loop
(`raysparse.loop.train_epochs`), which stamps the steps alike and puts the rates in the epoch records. Each
path uses the same threads per process (`--threads`; a Ray worker reserves that many CPUs). "Steady" = batch
size / median step time of the last epoch from its third step on (summed over workers): start-up, the first
batches, Ray Data's start of epoch and validation are left out, and the median shrugs off time slices other
processes take on a shared machine. "ex/CPU-s" is the same with process CPU time in place of wall time (every
thread of the process counts, Ray's included), which other processes' load does not move. `--repeats` runs
the sequence again and keeps each path's best.
Goal: 1 worker >= 0.97 x the plain loop.

bench gpu (no Ray): trains a BERT-base-size fused model (text tower fine-tuned in full) through a DeepSpeed
engine in bf16 and reports examples/s and MFU of the text tower against a bf16 matmul peak measured first
on the same device. Text-tower FLOPs per example, training (forward + backward = 3 x forward):
    3 x [2 x L x layers x (4 H^2 + 2 H I)  +  layers x 4 L^2 H]      (L = padded tokens, I = FFN width)
counted for the padded batch the GPU actually ran; the step time includes the DMF towers, the fusion head
and the optimizer, so the MFU is a lower bound for the tower. Goal: >= 50% at sequence length 128.
`--tiny` runs the same code on CPU in fp32 with a tiny BERT (a smoke test of the benchmark itself).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raysparse.bench.common import print_table
from raysparse.build import build_batches, build_model, prepare_data
from raysparse.config import config_from_dict, load_config
from raysparse.data.synthetic import FILLER_WORDS, generate_synthetic, topic_vocabulary
from raysparse.data.text import render_item_texts
from raysparse.engine import batch_to_device, build_engine, deepspeed_config, engine_dtype
from raysparse.errors import ConfigError
from raysparse.local import build_recommender
from raysparse.loop import train_local
from raysparse.model.text import build_tiny_encoder, write_word_tokenizer
from raysparse.step import compute_loss


def register_bench(subparsers) -> None:
    p = subparsers.add_parser("train", help="Training examples/s: plain loop vs Ray Train + DeepSpeed (1, 2 workers).")
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml-like sizes below).")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="Override one config key; repeatable.")
    p.add_argument("--users", type=int, default=3000, help="Synthetic users (when data.path is empty).")
    p.add_argument("--items", type=int, default=600, help="Synthetic items.")
    p.add_argument("--steps", type=int, default=60, help="Steps per epoch (train.max_steps_per_epoch).")
    p.add_argument("--epochs", type=int, default=2, help="Epochs per path; the last one is measured.")
    p.add_argument("--batch-size", type=int, default=64, help="Examples per step and worker.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per process (= CPUs per Ray worker).")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to run.")
    p.add_argument("--zero-stage", type=int, default=0, help="DeepSpeed ZeRO stage of the Ray runs.")
    p.add_argument("--repeats", type=int, default=1, help="Run the whole sequence again; keep each path's best.")
    p.add_argument("--address", default="", help="Ray cluster; empty: a local Ray instance for this benchmark.")
    p.add_argument("--output", default="runs/bench-train")
    p.set_defaults(func=run_train_bench)

    g = subparsers.add_parser("gpu", help="BERT-base fused model in bf16 through DeepSpeed: examples/s and MFU.")
    g.add_argument("--tiny", action="store_true", help="Tiny BERT, fp32 on CPU: checks the benchmark runs.")
    g.add_argument("--seq-len", type=int, default=128, help="Tokens of a user's history text.")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--steps", type=int, default=30, help="Timed steps (after --warmup steps).")
    g.add_argument("--warmup", type=int, default=5)
    g.add_argument("--zero-stage", type=int, default=0)
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="Engine precision on GPU (--tiny: always fp32).")
    g.add_argument("--prefetch-threads", type=int, default=2, help="CPU threads building batches ahead.")
    g.add_argument("--output", default="runs/bench-gpu")
    g.add_argument("--json", default="", help="Also write the result row to this JSON file.")
    g.set_defaults(func=run_gpu_bench)


# ------------------------------------------------------------------------------------------------ bench train

def _bench_config(args: argparse.Namespace, output: Path):
    sets = [f"output={output}", f"data.synthetic_users={args.users}", f"data.synthetic_items={args.items}",
            f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps}",
            f"train.batch_size_per_worker={args.batch_size}", f"ray.cpus_per_worker={args.threads}",
            f"ray.zero_stage={args.zero_stage}"]
    if args.config is None:
        encoder = build_tiny_encoder(output / "tiny_bert", _synthetic_words(), hidden=64, layers=2)
        sets = ["data.text_template={title}. {genres}", "data.max_length=64", "data.max_history=20",
                "model.finetune=top", "model.finetune_top_layers=1", f"model.text_model={encoder}",
                "model.text_dim=32", "model.dmf_user_layers=[64,32]", "model.dmf_item_layers=[64,32]",
                "model.fusion_dim=32", "train.negatives_per_positive=32"] + sets
    return load_config(args.config, sets + list(args.sets))


def _synthetic_words() -> list[str]:
    words = list(FILLER_WORDS)
    for genre, topic_words in topic_vocabulary(64):
        words += [genre] + topic_words
    return [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] + ["0 1 2 3 4 5 6 7 8 9 . , ; :"]


def run_train_bench(args: argparse.Namespace) -> int:
    out = Path(args.output).resolve()
    config = _bench_config(args, out)
    prepared = prepare_data(config)
    print(f"data: {json.dumps(prepared.split.stats)}")
    torch.set_num_threads(args.threads)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    best: dict[str, dict] = {}

    def keep(row: dict) -> None:
        if row["path"] not in best or row["steady ex/s"] > best[row["path"]]["steady ex/s"]:
            best[row["path"]] = row

    import ray  # optional heavy import: `bench gpu` (same module) runs without Ray

    started_ray = not ray.is_initialized()
    prepared_ref = None
    try:
        for repeat in range(args.repeats):
            row = _plain_run(config, prepared, out, args.threads)
            keep(row)
            print(f"[{repeat + 1}/{args.repeats}] plain loop: {row['steady ex/s']:.0f} ex/s")
            if prepared_ref is None:
                prepared_ref = _start_ray(args, prepared)
            for workers in worker_counts:
                shutil.rmtree(out / f"ray{workers}", ignore_errors=True)
                row = _ray_run(config, prepared, prepared_ref, out, workers, args)
                keep(row)
                print(f"[{repeat + 1}/{args.repeats}] ray {workers} worker(s): {row['steady ex/s']:.0f} ex/s")
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    rows = list(best.values())
    plain, plain_cpu = rows[0]["steady ex/s"], rows[0]["ex/CPU-s"]
    for row in rows:
        row["vs plain"] = row["steady ex/s"] / plain
        row["vs plain (CPU)"] = row["ex/CPU-s"] / plain_cpu
    print()
    print_table(rows, ["path", "workers", "threads/worker", "steady ex/s", "vs plain", "ex/CPU-s", "vs plain (CPU)",
                       "last-epoch ex/s", "wall s"])
    one = next((r for r in rows[1:] if r["workers"] == 1), None)
    if one is not None:
        verdict = "met" if one["vs plain"] >= 0.97 else "NOT met"
        print(f"\ngoal 1 worker >= 0.97 x plain loop: {one['vs plain']:.3f} wall-clock -> {verdict}; "
              f"{one['vs plain (CPU)']:.3f} per CPU-second (batch {config.train.batch_size_per_worker}, "
              f"{config.train.max_steps_per_epoch} steps/epoch, {config.train.epochs} epochs, best of "
              f"{args.repeats}). On a loaded machine the wall-clock ratio moves with other processes; examples "
              f"per CPU-second of each process (Ray's own threads included) do not.")
    (out / "bench_train.json").write_text(json.dumps(rows, indent=2))
    return 0


def _plain_run(config, prepared, out: Path, threads: int) -> dict:
    rec = build_recommender(config, prepared, str(out / "cache"))
    t0 = time.perf_counter()
    last = train_local(config, rec.model.train(), rec.builder, log=lambda r: None)[-1]
    return {"path": "plain loop (torch AdamW)", "workers": 1, "threads/worker": threads,
            "steady ex/s": last["steady_examples_per_s"], "ex/CPU-s": last["steady_examples_per_cpu_s"],
            "last-epoch ex/s": last["examples_per_s"], "wall s": time.perf_counter() - t0}


def _start_ray(args: argparse.Namespace, prepared):
    import ray  # optional heavy import: `bench gpu` (same module) runs without Ray

    if not ray.is_initialized():
        if args.address:
            ray.init(address=args.address)
        else:
            ray.init(address="local", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.put(prepared)


def _ray_run(config, prepared, prepared_ref, out: Path, workers: int, args: argparse.Namespace) -> dict:
    # The Ray shells import ray: imported here so that `bench gpu` (same module) runs without Ray.
    from raysparse.ray_data import build_example_dataset
    from raysparse.ray_train import build_trainer

    cfg = config.replace(**{"ray.num_workers": workers, "output": str(out / f"ray{workers}"),
                            "ray.storage_path": str(out / f"ray{workers}" / "ray")})
    dataset = build_example_dataset(prepared.split, cfg.train.example_mode, num_blocks=max(8, 4 * workers),
                                    progress_bars=False, max_history=cfg.data.max_history)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, prepared_ref, dataset, dataset.count(), deepspeed_config(cfg, workers),
                            validate=False)
    last = trainer.fit().metrics
    return {"path": f"Ray Train + DeepSpeed (ZeRO {args.zero_stage}), {workers} worker(s)", "workers": workers,
            "threads/worker": args.threads, "steady ex/s": float(last["steady_examples_per_s"]),
            "ex/CPU-s": float(last["steady_examples_per_cpu_s"]),
            "last-epoch ex/s": float(last["examples_per_s"]), "wall s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ bench gpu

def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured dense matmul throughput (TFLOP/s) of (n x n) @ (n x n) in `dtype` on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_tower_train_flops(batch: int, tokens: int, layers: int, hidden: int, ffn: int) -> float:
    """Training FLOPs (forward + backward) of a BERT encoder over a (batch, tokens) padded batch."""
    dense = 2 * tokens * layers * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = layers * 4 * tokens * tokens * hidden
    return 3.0 * batch * (dense + attention)


def _write_encoder(folder: Path, texts: list[str], tiny: bool) -> str:
    """A randomly initialised encoder with a vocabulary covering `texts`: BERT-base shape (12 layers, 768
    wide, 12 heads, FFN 3072) or, with tiny, 2 layers of 32. No download."""
    if tiny:
        return build_tiny_encoder(folder, texts, hidden=32, layers=2)
    from transformers import BertConfig, BertModel  # heavy (seconds); only this path needs it

    vocab_size = write_word_tokenizer(folder, texts)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def _init_single_process_group() -> None:
    """DeepSpeed wants torch.distributed; one process, world size 1 (no launcher, no Ray)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def _prefetch(make_batch, n: int, threads: int, device: torch.device):
    """Yield n batches built by `threads` CPU threads ahead of the GPU (pinned, copied asynchronously)."""
    q: queue.Queue = queue.Queue(maxsize=4 * max(1, threads))
    counter = iter(range(n))
    lock = threading.Lock()

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            batch = make_batch(rng)
            if device.type == "cuda":
                batch = {k: v.pin_memory() for k, v in batch.items()}
            q.put(batch)

    workers = [threading.Thread(target=work, args=(s,), daemon=True) for s in range(max(1, threads))]
    for w in workers:
        w.start()
    for _ in range(n):
        yield q.get()


def run_gpu_bench(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise ConfigError("bench gpu: no CUDA device here; run it on a GPU machine, or add --tiny to check the "
                          "benchmark on CPU (fp32, tiny BERT).")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    precision = args.precision if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    out = Path(args.output).resolve()
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_tflops(device, dtype, n=8192 if cuda else 512, iters=30 if cuda else 5)
    print(f"measured {precision} matmul peak on {device}: {peak:.3g} TFLOP/s")

    data = out / "data"
    if not (data / "interactions.parquet").exists():
        generate_synthetic(str(data), n_users=200 if args.tiny else 20000, n_items=100 if args.tiny else 2000, seed=0,
                           mean_interactions=40.0)
    raw = {"output": str(out), "data": {"path": str(data), "text_template": "{title}. {genres}. {description}",
                                        "max_length": args.seq_len, "max_history": 50, "cohort_fraction": 0.0},
           "model": {"variant": "fused", "finetune": "full", "text_dim": 256, "fusion_dim": 256,
                     "dmf_user_layers": [256, 256], "dmf_item_layers": [256, 256], "dropout": 0.1},
           "train": {"batch_size_per_worker": args.batch_size, "epochs": 1, "negatives_per_positive": 256,
                     "lr": 1e-3, "text_lr": 5e-5, "grad_clip": 1.0},
           "ray": {"num_workers": 1, "use_gpu": cuda, "zero_stage": args.zero_stage,
                   "precision": precision if cuda else "fp32"}}
    if args.tiny:
        raw["model"].update(text_dim=16, fusion_dim=16, dmf_user_layers=[32, 16], dmf_item_layers=[32, 16])
        raw["train"]["negatives_per_positive"] = 32
    config = config_from_dict(raw)
    items = pd.read_parquet(data / "items.parquet")
    encoder_dir = _write_encoder(out / ("tiny_bert" if args.tiny else "bert_base"),
                                 render_item_texts(items, config.data.text_template), args.tiny)
    config = config.replace(**{"model.text_model": encoder_dir})
    prepared = prepare_data(config)
    model, _, item_text = build_model(config, prepared.split.n_users, prepared.split.n_items, prepared.item_texts,
                                      str(out / "cache"))
    enc_cfg = model.text.encoder.config
    builder = build_batches(config, prepared.split, item_text)
    users, targets, positions = builder.training_examples("prefix")
    # Long histories, so a user's text fills the token budget (the goal is stated at sequence length 128).
    long = positions >= min(int(np.percentile(positions, 75)), 8)
    users, targets, positions = users[long], targets[long], positions[long]

    def make_batch(rng: np.random.Generator) -> dict:
        sel = rng.integers(0, len(users), size=args.batch_size)
        hist, w = builder.example_histories(users[sel], positions[sel], "prefix")
        return builder.collate(users[sel], targets[sel], hist, w, rng)

    _init_single_process_group()
    total = args.warmup + args.steps
    ds_config = deepspeed_config(config, 1)
    engine = build_engine(model, config, ds_config, total)
    engine_dt = engine_dtype(ds_config)
    flops = 0.0
    examples = tokens = real_tokens = 0
    t_start = None
    for step, batch in enumerate(_prefetch(make_batch, total, args.prefetch_threads, device)):
        if step == args.warmup:
            _sync(device)
            t_start = time.perf_counter()
        batch = batch_to_device(batch, device, engine_dt)
        loss = compute_loss(engine(batch), config.train.loss)
        engine.backward(loss)
        engine.step()
        if step >= args.warmup:
            b, length = batch["input_ids"].shape
            flops += text_tower_train_flops(b, length, enc_cfg.num_hidden_layers, enc_cfg.hidden_size,
                                            enc_cfg.intermediate_size)
            examples += b
            tokens += b * length
            real_tokens += int(batch["attention_mask"].sum())
    _sync(device)
    seconds = time.perf_counter() - t_start
    achieved = flops / seconds / 1e12
    row = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "precision": precision,
           "encoder": f"{enc_cfg.num_hidden_layers}x{enc_cfg.hidden_size}", "seq len": args.seq_len,
           "batch": args.batch_size, "ZeRO": args.zero_stage, "examples/s": examples / seconds,
           "tokens/s": tokens / seconds, "real/padded tokens": real_tokens / max(tokens, 1),
           "text TFLOP/s": achieved, "peak TFLOP/s": peak, "text MFU": achieved / peak,
           "loss": float(loss.item())}
    print_table([row])
    print(f"\ngoal text-tower MFU >= 0.50 at seq len 128: {row['text MFU']:.3f}"
          + ("" if cuda else " (--tiny on CPU: a smoke test, not the goal's measurement)"))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0
