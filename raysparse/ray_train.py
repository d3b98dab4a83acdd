"""Distributed training on Ray Train with a DeepSpeed engine: `raysparse train` (without --local) and
`jobs/train.py`.

Driver, `run_ray_training(config, resume)`:
  1. Checks that need no data: the DeepSpeed JSON, the encoder, the cluster's CPUs/GPUs, the run folder
     (`check_before_start`): a bad config is one ConfigError before any worker starts.
  2. Prepares the data (`raysparse.ray_data.prepare_for_ray`: pandas for small local data, Ray Data for
     URIs and large logs) and puts the `Prepared` split in the object store once; every worker builds the
     same model and batches from it with `raysparse.build` (the split is what each worker needs anyway:
     item columns and seen-item masks).
  3. Builds the training-example dataset with `map_batches` (materialized) and `build_trainer(...).fit()`.
  4. Copies the best checkpoint's artifact (by validation NDCG@10) to <output>/artifact, evaluates it on
     the validation and test splits in one process, writes <output>/summary.json. Same summary shape as
     `raysparse.local.run_local`.

Worker, `train_loop_per_worker(loop_config)`: the loop of `raysparse.step.train_local` with
`deepspeed.initialize` in place of the torch optimizer (`build_engine`): ZeRO stage, precision, gradient
accumulation and clipping from `deepspeed_config`; the text encoder and the rest keep their own learning
rates (param groups) under one warm-up + decay schedule (a torch LambdaLR that DeepSpeed steps at each
accumulation boundary). Each epoch: train on this worker's shard, validate with the full-ranking protocol
(each worker ranks a disjoint slice of users; ranks are all-gathered, so the metric is exactly the
single-process one), then `ray.train.report(metrics, checkpoint)`. A checkpoint holds the DeepSpeed state
(weights, optimizer, LR schedule; one optimizer shard per rank under ZeRO 1-2, merged by Ray into one
folder), `train_state.json` (epoch, history) and `artifact/`, the self-contained serving artifact.
Randomness (shuffling, negatives, dropout) is seeded from (train.seed, epoch, rank), so a restored run
draws what the uninterrupted run would have drawn.

Observability: rank 0 prints one line per epoch (plus a progress line every 15 s inside long epochs) and
writes <output>/logs/metrics.jsonl, metrics.csv and TensorBoard events (`EpochLog`).

Fault tolerance: `FailureConfig(max_failures)` restarts the worker group from the latest checkpoint.
`resume=True` re-attaches to the run folder (`<ray.storage_path>/train`); Ray Train V2 restores its
checkpoint list from there and workers continue after the last reported epoch.

The DeepSpeed config and engine live in `raysparse.engine` (no Ray), which `raysparse bench gpu` also uses on
a GPU machine without Ray.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from raysparse.artifact import write_config
from raysparse.config import Config, config_from_dict
from raysparse.data.examples import all_item_bags
from raysparse.engine import batch_to_device, build_engine, engine_dtype, first_run_compilation_note, resolved_precision
from raysparse.errors import ConfigError
from raysparse.local import apply_text_prior_choice, epoch_line
from raysparse.metrics import ScoreFn
from raysparse.preflight import (RUN_NAME, absolute_paths, check_before_start, check_run_folder, check_static,
                                  launcher_max_resources, run_location)
from raysparse.recommender import Recommender
from raysparse.step import SELECT_METRIC, epochs_since_best

if TYPE_CHECKING:
    import ray
    from ray.train.torch import TorchTrainer

TEST_KILL_ENV = "RAYSPARSE_TEST_KILL_AFTER_EPOCH"  # test hook: rank 1 (or 0) SIGKILLs itself once, next epoch
LOG_DIR = "logs"


# ------------------------------------------------------------------------------------------------ checks

def cluster_capacity() -> dict[str, float]:
    """Resources the connected cluster has now, or can grow to under its autoscaler (whichever is more):
    an autoscaling GPU group with no node up yet still counts."""
    import ray

    capacity = {k: float(v) for k, v in ray.cluster_resources().items()}
    sources = [launcher_max_resources()]
    try:  # node types reported to the GCS (KubeRay, autoscaler v2): what Ray Train itself checks
        from ray._private.state import state

        sources.append(state.get_max_resources_from_cluster_config() or {})
    except Exception:  # noqa: BLE001 - not an autoscaling cluster, or another Ray version
        pass
    for source in sources:
        for key, value in source.items():
            capacity[key] = max(capacity.get(key, 0.0), float(value))
    return capacity


# ------------------------------------------------------------------------------------------------ worker

class DeviceRecommender(Recommender):
    """The core Recommender with its model on `device` (a GPU worker's): inputs move there, vectors and
    scores come back to CPU. Same arithmetic as Recommender.refresh / score_inputs; on CPU it is the same
    computation (the distributed-validation test compares its metrics with the core class's)."""

    def __init__(self, model, device, *args, **kwargs):
        self.device = torch.device(device)
        super().__init__(model, *args, **kwargs)

    @torch.no_grad()
    def refresh(self) -> None:
        was_training = self.model.training
        self.model.eval()
        keys = ("cand_items", "col_users", "col_offsets", "col_weights")
        vecs = [self.model.item_vectors(*(b[k].to(self.device) for k in keys)).float().cpu()
                for b in all_item_bags(self.builder)]
        self.item_vectors = torch.cat(vecs).float()
        self.refresh_item_text()
        self.model.train(was_training)

    @torch.no_grad()
    def score_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        users = self.model.user_vectors({k: v.to(self.device) for k, v in inputs.items()}).float().cpu()
        self.model.train(was_training)
        return self.model.score(users, self.item_vectors)


def distributed_ranks(score_fn: ScoreFn, split, users: np.ndarray, stage: str, batch_size: int, rank: int,
                      world: int) -> np.ndarray:
    """Full-ranking ranks (N,) of `users`: this worker ranks users[rank::world], then all ranks are gathered
    and put back in `users` order, so every worker holds exactly what one process would compute."""
    from raysparse.metrics import full_ranks

    mine = full_ranks(score_fn, split, users[rank::world], stage, batch_size)
    if world == 1:
        return mine
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    out = np.zeros(len(users), np.int64)
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


class EpochLog:
    """Rank 0's per-epoch records: <output>/logs/metrics.jsonl, metrics.csv and TensorBoard events
    (logs/tensorboard). On restore the files are rewritten from the checkpoint's history and TensorBoard
    purges the events after the restored epoch."""

    def __init__(self, folder: Path, history: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._write_tables(history)
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=len(history) + 1 if history else None)

    def _write_tables(self, history: list[dict]) -> None:
        import pandas as pd

        (self.folder / "metrics.jsonl").write_text("".join(json.dumps(r, default=float) + "\n" for r in history))
        if history:
            pd.DataFrame(history).to_csv(self.folder / "metrics.csv", index=False)

    def add(self, record: dict, history: list[dict]) -> None:
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        import pandas as pd

        pd.DataFrame(history).to_csv(self.folder / "metrics.csv", index=False)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, float(value), record["epoch"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker. loop_config: config (dict), prepared (ObjectRef of Prepared), n_examples,
    ds_config, test_kill (None or {after_epoch, rank, flag})."""
    import ray
    import ray.train

    from raysparse.build import build_batches, build_model
    from raysparse.local import item_table
    from raysparse.metrics import flatten, summarize
    from raysparse.ray_data import iter_example_batches
    from raysparse.step import compute_loss, keep_freed_memory

    keep_freed_memory()
    config = config_from_dict(loop_config["config"])
    tc, rc = config.train, config.ray
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(rc.cpus_per_worker)))
    prepared = ray.get(loop_config["prepared"])
    split = prepared.split
    for name, value in vars(split).items():  # object-store arrays are read-only; scipy sorts CSRs in place
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            setattr(split, name, value.copy())
    output = Path(config.output)
    say = print if rank == 0 else (lambda *a, **k: None)

    model, tokenizer, item_text = build_model(config, split.n_users, split.n_items, prepared.item_texts,
                                              config.data.resolved_cache_dir)
    builder = build_batches(config, split, item_text)
    ds_config = loop_config["ds_config"]
    micro = ds_config["train_micro_batch_size_per_gpu"]
    accum = ds_config["gradient_accumulation_steps"]
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    dtype = engine_dtype(ds_config)
    shard_rows = loop_config["n_examples"] // world                  # Ray splits shards equally
    steps = max(1, math.ceil(shard_rows / micro))
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    if rc.use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    # Validation and the artifact read full fp32 weights: a separate copy (on the worker's device) when the
    # engine's weights are half precision or partitioned (ZeRO-3); otherwise the engine's module itself.
    needs_copy = dtype != torch.float32 or stage == 3
    eval_copy = copy.deepcopy(model).float() if needs_copy else None  # before ZeRO-3 partitions it
    engine = build_engine(model, config, ds_config, steps * tc.epochs // accum)
    device = engine.device
    eval_model = eval_copy.to(device) if needs_copy else engine.module

    history: list[dict] = []
    start_epoch = 0
    restored_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(str(Path(folder) / "deepspeed"), tag="state")
            state = json.loads((Path(folder) / "train_state.json").read_text())
        start_epoch, history = state["epoch"], state["history"]
        restored_from = start_epoch
        say(f"restored from the checkpoint of epoch {start_epoch}; continuing with epoch {start_epoch + 1}")
    log = EpochLog(output / LOG_DIR, history) if rank == 0 else None

    def sync_eval_weights() -> None:
        if not needs_copy:
            return
        if stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        else:
            state = {k: v.detach().float() for k, v in engine.module.state_dict().items()}
        eval_model.load_state_dict(state)

    rec = DeviceRecommender(eval_model, device, config, prepared.log.users, prepared.log.items, builder,
                            tokenizer, item_table(prepared))
    shard = ray.train.get_dataset_shard("train")
    hook = loop_config.get("test_kill")
    reported_at = time.monotonic()

    for epoch in range(start_epoch, tc.epochs):
        engine.train()
        rng = np.random.default_rng([tc.seed, epoch, rank])
        torch.manual_seed(tc.seed * 100_003 + epoch * 101 + rank)
        losses: list[float] = []
        stamps: list[float] = []
        cpu_stamps: list[float] = []   # process CPU time: the same measure, blind to other processes' load
        t0 = last_print = time.perf_counter()
        examples = 0
        examples_iter = iter_example_batches(shard, micro, seed=tc.seed * 7919 + epoch * 31 + rank)
        for step, (users, targets, positions) in zip(range(steps), examples_iter):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            batch = batch_to_device(builder.training_batch(users, targets, positions, tc.example_mode, rng),
                                    device, dtype)
            loss = compute_loss(engine(batch), tc.loss)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.item()))
            examples += len(users)
            if hook and rank == hook["rank"] and epoch == hook["after_epoch"] and step == 0:
                _maybe_kill(hook, reported_at)
            now = time.perf_counter()
            if now - last_print >= 15.0:
                say(f"epoch {epoch + 1}: step {step + 1}/{steps} loss={np.mean(losses[-50:]):.4f} "
                    f"{examples * world / (now - t0):.0f} ex/s")
                last_print = now
        t_end, cpu_end = time.perf_counter(), time.process_time()
        examples_iter.close()  # a capped epoch leaves the shard's iterator suspended: release it now
        seconds = t_end - t0
        steady = steady_rate(stamps + [t_end], micro)
        steady_cpu = steady_rate(cpu_stamps + [cpu_end], micro)
        totals = _all_reduce([float(np.sum(losses)), float(len(losses)), float(examples)], "sum", world, device)
        slowest = _all_reduce([seconds], "max", world, device)[0]
        steady_total, steady_cpu_total = _all_reduce([steady, steady_cpu], "sum", world, device)
        lrs = {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
        record: dict[str, Any] = {
            "epoch": epoch + 1, "loss": totals[0] / max(totals[1], 1.0), "train_seconds": slowest,
            "examples_per_s": totals[2] / max(slowest, 1e-9), "steady_examples_per_s": steady_total,
            "steady_examples_per_cpu_s": steady_cpu_total,
            "steps": len(losses), "workers": world, **{f"lr/{k}": v for k, v in lrs.items()},
        }
        if restored_from is not None:
            record["restored_from_epoch"] = restored_from
        if loop_config.get("validate", True):
            t_val = time.perf_counter()
            sync_eval_weights()
            rec.refresh()
            users_eval = split.evaluated_users
            ranks = distributed_ranks(rec.score_users, split, users_eval, "val", tc.eval_batch_size, rank, world)
            record.update(flatten(summarize(ranks, split, users_eval), "val/"))
            record["val_seconds"] = time.perf_counter() - t_val
        engine.train()
        history.append(record)
        if log is not None:
            log.add(record, history)
            say(epoch_line(record))  # one console format for local and Ray runs
        with tempfile.TemporaryDirectory(prefix="raysparse-ckpt-") as tmp:
            engine.save_checkpoint(str(Path(tmp) / "deepspeed"), tag="state")
            if rank == 0:
                (Path(tmp) / "train_state.json").write_text(
                    json.dumps({"epoch": epoch + 1, "history": history}, default=float))
                if loop_config.get("validate", True):
                    rec.save(Path(tmp) / "artifact", metrics={"val": {k: v for k, v in record.items()
                                                                      if k.startswith("val/")},
                                                              "epoch": epoch + 1})
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        reported_at = time.monotonic()
        # Every rank holds the same all-reduced validation record, so all of them stop at the same epoch.
        if tc.patience and epochs_since_best(history, SELECT_METRIC) >= tc.patience:
            say(f"early stop after epoch {epoch + 1}: no better {SELECT_METRIC} for {tc.patience} epochs")
            break
    if log is not None:
        log.close()


def steady_rate(stamps: list[float], batch_size: int, skip: int = 2) -> float:
    """Examples/s of one process in steady state: batch / median step time, from the (skip+1)-th step on.
    `stamps` = when each step began, then when the last one ended. The median keeps the number stable on a
    shared machine, where other processes steal whole time slices."""
    durations = np.diff(np.asarray(stamps, np.float64))
    if len(durations) > skip + 1:
        durations = durations[skip:]
    return float(batch_size / np.median(durations)) if len(durations) else 0.0


def _all_reduce(values: list[float], op: str, world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL (GPU workers) reduces device tensors
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _maybe_kill(hook: dict, reported_at: float) -> None:
    """Test hook: SIGKILL this worker once (a flag file marks it done), a few seconds after the previous
    epoch's report, so Ray's controller has registered that checkpoint (it polls workers every 2 s)."""
    flag = Path(hook["flag"])
    if flag.exists():
        return
    time.sleep(max(0.0, 5.0 - (time.monotonic() - reported_at)))
    flag.write_text(str(os.getpid()))
    print(f"test hook {TEST_KILL_ENV}: killing worker process {os.getpid()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ driver

def training_dataset(config: Config, prepared) -> tuple["ray.data.Dataset", int]:
    """The training examples as a materialized Ray Dataset and their count; enough for every worker."""
    from raysparse.ray_data import build_example_dataset

    dataset = build_example_dataset(prepared.split, config.train.example_mode,
                                    num_blocks=max(8, 4 * config.ray.num_workers), progress_bars=False,
                                    max_history=config.data.max_history)
    n_examples = dataset.count()
    if n_examples // config.ray.num_workers < 1:
        raise ConfigError(f"only {n_examples} training examples for ray.num_workers={config.ray.num_workers}; "
                          f"use fewer workers or more data.")
    return dataset, n_examples


def build_trainer(config: Config, prepared_ref: "ray.ObjectRef", dataset: "ray.data.Dataset", n_examples: int,
                  ds_config: dict, test_kill: dict | None = None, validate: bool = True,
                  callbacks: list | None = None) -> "TorchTrainer":
    """A TorchTrainer (not started) for `config`. prepared_ref: the object-store ref of a `Prepared`;
    dataset: `ray_data.build_example_dataset` (n_examples rows); ds_config: `deepspeed_config`.
    validate=False (benchmarks) skips validation and the artifact in checkpoints. callbacks: Ray Train
    callbacks for the RunConfig (Tune's TuneReportCallback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysparse.ray_data import shuffled_per_epoch

    rc = config.ray
    storage, _ = run_location(config)
    resources = {"CPU": rc.cpus_per_worker}
    if rc.use_gpu:
        resources["GPU"] = 1
    loop_config = {"config": config.to_dict(), "prepared": prepared_ref, "n_examples": int(n_examples),
                   "ds_config": ds_config, "test_kill": test_kill, "validate": validate}
    checkpoints = (CheckpointConfig(num_to_keep=rc.keep_checkpoints, checkpoint_score_attribute=SELECT_METRIC,
                                    checkpoint_score_order="max") if validate
                   else CheckpointConfig(num_to_keep=1))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage, checkpoint_config=checkpoints,
                             failure_config=FailureConfig(max_failures=rc.max_failures),
                             callbacks=list(callbacks or [])),
        datasets={"train": shuffled_per_epoch(dataset, config.train.seed)},
    )


def _test_kill_hook(config: Config) -> dict | None:
    value = os.environ.get(TEST_KILL_ENV, "")
    if not value:
        return None
    return {"after_epoch": int(value), "rank": 1 if config.ray.num_workers > 1 else 0,
            "flag": str(Path(config.output) / ".test_kill_done")}


def connect(config: Config) -> None:
    """ray.init on ray.address, else the current cluster if there is one, else a new local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray.address or None)


def run_ray_training(config: Config, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train on the current Ray cluster; returns the summary of `raysparse.local.run_local` plus
    checkpoint/run paths. Writes <output>/artifact, <output>/summary.json and <output>/logs."""
    import ray

    from raysparse.local import validation_metrics
    from raysparse.ray_data import prepare_for_ray

    t0 = time.perf_counter()
    config = absolute_paths(config)
    ds_config = check_static(config)
    storage, run_dir = run_location(config)
    check_run_folder(run_dir, resume, config.train.epochs)
    connect(config)
    check_before_start(config, cluster_capacity())

    prepared = prepare_for_ray(config)
    log(f"data ({prepared.report.get('reader', 'pandas')} reader): {json.dumps(prepared.split.stats)}")
    dataset, n_examples = training_dataset(config, prepared)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, ray.put(prepared), dataset, n_examples, ds_config, _test_kill_hook(config))
    log(f"training: {config.ray.num_workers} workers, ZeRO {ds_config['zero_optimization']['stage']}, "
        f"{resolved_precision(config)}, run folder {run_dir}")
    note = first_run_compilation_note(config)
    if note:
        log(note)
    result = trainer.fit()

    best_ckpt, best_metrics = max(result.best_checkpoints or [(result.checkpoint, result.metrics)],
                                  key=lambda cm: cm[1].get(SELECT_METRIC, float("-inf")))
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / "train_state.json").read_text())["history"]
    artifact = out / "artifact"
    with best_ckpt.as_directory() as folder:
        tmp = out / "artifact.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(folder) / "artifact", tmp)
    shutil.rmtree(artifact, ignore_errors=True)
    tmp.rename(artifact)

    # The artifact, evaluated in one process on the prepared split (the artifact itself has no held-out items).
    from raysparse.build import build_batches

    rec = Recommender.load(artifact)
    rec.builder = build_batches(rec.config, prepared.split, rec.builder.item_text)
    if config.train.choose_text_prior and apply_text_prior_choice(rec, prepared, log):
        write_config(artifact, rec.config)                 # chosen on validation, kept in the artifact's config
    val = validation_metrics(rec, prepared, "val", sampled=True)
    test = validation_metrics(rec, prepared, "test", sampled=True)
    best_epoch = int(best_metrics["epoch"])
    (artifact / "metrics.json").write_text(json.dumps({"val": val, "test": test, "best_epoch": best_epoch},
                                                      indent=2, default=float))
    restored = sorted({r["restored_from_epoch"] for r in history if "restored_from_epoch" in r})
    summary = {"history": history, "best_epoch": best_epoch, "val": val, "test": test,
               "seconds": time.perf_counter() - t0, "data": prepared.split.stats, "validation": prepared.report,
               "run_dir": run_dir, "best_checkpoint": best_ckpt.path, "restored_from_epochs": restored,
               "deepspeed": ds_config}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log(f"best epoch {best_epoch}: val ndcg@10={val.get(SELECT_METRIC, float('nan')):.4f}; "
        f"artifact: {artifact}; logs: {out / LOG_DIR}")
    return summary
