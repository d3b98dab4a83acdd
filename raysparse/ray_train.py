"""Distributed training on Ray Train: `raysparse train` (without --local) and `jobs/train.py`. Only what
calls Ray is here; the training itself is the core's (`raysparse.loop.train_epochs` stepping a DeepSpeed
engine of `raysparse.engine`), the checks before a run are `raysparse.preflight`'s.

Driver, `run_ray_training(config, resume)`:
  1. Checks that need no data (`preflight`: the DeepSpeed JSON, the encoder, the run folder) and the
     cluster's CPUs/GPUs (`cluster_capacity`): a bad config is one ConfigError before any worker starts.
  2. Prepares the data (`raysparse.ray_data.prepare_for_ray`: pandas for small local data, Ray Data for
     URIs and large logs) and puts the `Prepared` split in the object store once; every worker builds the
     same model and batches from it (the split is what each worker needs anyway: item columns and seen-item
     masks).
  3. Builds the training-example dataset (`training_dataset`) and `build_trainer(...).fit()`.
  4. Copies the best checkpoint's artifact (by validation NDCG@10) to <output>/artifact, evaluates it on
     the validation and test splits in one process, writes <output>/summary.json. Same summary shape as
     `raysparse.local.run_local`.

Worker, `train_loop_per_worker(loop_config)`: builds `engine.DeepSpeedTraining` and runs the core loop on its
shard of the dataset; each epoch's record and checkpoint (DeepSpeed state, `train_state.json` with the
history, the serving `artifact/`) go to `ray.train.report`. Randomness (shuffling, negatives, dropout) is
seeded from (train.seed, epoch, rank) and each worker's shard holds the same blocks in every run
(`ray_data.fixed_block_order`), so a restored run draws what the uninterrupted run would have drawn; the rest
of its state comes from the checkpoint (`DeepSpeedTraining.restore`). A run resumed at an epoch boundary ends
with exactly the uninterrupted run's losses and validation metrics (tested after a killed worker, ZeRO 2,
and after a killed driver and --resume, ZeRO 0 and 2; docs/RELIABILITY.md).
Rank 0 prints one line per epoch (and a progress line every 15 s inside long epochs) and writes
<output>/logs (`loop.EpochLog`: metrics.jsonl, metrics.csv, TensorBoard events, workers.jsonl).

Fault tolerance: `FailureConfig(max_failures)` restarts the worker group from the latest checkpoint.
`resume=True` re-attaches to the run folder (`<ray.storage_path>/train`); Ray Train V2 restores its
checkpoint list from there and workers continue after the last reported epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from raysparse.artifact import replace_directory, write_config
from raysparse.build import Prepared, build_batches
from raysparse.config import Config, config_from_dict
from raysparse.engine import DeepSpeedTraining, first_run_compilation_note, resolved_precision
from raysparse.errors import ConfigError
from raysparse.local import apply_text_prior_choice, epoch_line, stage_metrics, validation_metrics
from raysparse.loop import BestEpoch, EpochLog, all_gather, train_epochs
from raysparse.metrics import strict_json
from raysparse.preflight import (RUN_NAME, absolute_paths, check_before_start, check_run_folder, check_static,
                                  launcher_max_resources, run_location)
from raysparse.recommender import Recommender
from raysparse.step import SELECT_METRIC, keep_freed_memory, steps_per_epoch

if TYPE_CHECKING:
    import ray
    from ray.train.torch import TorchTrainer

LOG_DIR = "logs"


# ------------------------------------------------------------------------------------------------ worker

def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker. loop_config: config (dict), prepared (ObjectRef of a Prepared), n_examples (rows
    of the training dataset), ds_config (`engine.deepspeed_config`), validate (False: no validation and no
    artifact in checkpoints)."""
    import ray
    import ray.train

    from raysparse.ray_data import iter_example_batches

    keep_freed_memory()
    config = config_from_dict(loop_config["config"])
    tc, rc = config.train, config.ray
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(rc.cpus_per_worker)))
    if rc.use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    prepared = ray.get(loop_config["prepared"])
    for name, value in vars(prepared.split).items():  # object-store arrays are read-only; scipy sorts CSRs in place
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            setattr(prepared.split, name, value.copy())
    ds_config, validate = loop_config["ds_config"], loop_config["validate"]
    micro = ds_config["train_micro_batch_size_per_gpu"]
    steps = steps_per_epoch(loop_config["n_examples"] // world, micro, tc.max_steps_per_epoch)  # equal shards
    run = DeepSpeedTraining(config, prepared, ds_config, steps * tc.epochs // ds_config["gradient_accumulation_steps"],
                            rank, world)
    say = print if rank == 0 else (lambda line: None)

    restored: list[dict] = []  # the history in the checkpoint Ray Train hands a restarted or resumed run
    best = BestEpoch()          # the best epoch so far, with its per-user validation (train.patience_z)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restored = run.restore(Path(folder))
            best = BestEpoch.load(Path(folder), restored)
        say(f"restored from the checkpoint of epoch {len(restored)}; continuing with epoch {len(restored) + 1}")
    log = EpochLog(Path(config.output) / LOG_DIR, restored) if rank == 0 else None
    workers = all_gather({"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}, world)
    if log is not None:
        log.add_workers(workers, first_epoch=len(restored) + 1)
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([tc.seed, epoch, rank])
        torch.manual_seed(tc.seed * 100_003 + epoch * 101 + rank)
        examples = iter_example_batches(shard, micro, seed=tc.seed * 7919 + epoch * 31 + rank)
        for _, (users, targets, positions) in zip(range(steps), examples):
            yield run.builder.training_batch(users, targets, positions, tc.example_mode, rng)
        examples.close()  # a capped epoch leaves the shard's iterator suspended: release it now

    def report(record: dict, history: list[dict]) -> None:
        if log is not None:
            log.add(record, history)
            say(epoch_line(record))  # one console format for local and Ray runs
        with tempfile.TemporaryDirectory(prefix="raysparse-ckpt-") as tmp:
            run.save(Path(tmp), record, history, artifact=validate)
            if rank == 0:
                best.save(Path(tmp))
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{record['epoch']:04d}")

    train_epochs(tc, run.stepper, epoch_batches, steps=steps, batch_size=micro, report=report,
                 evaluate=(lambda epoch: run.evaluate()) if validate else None, history=restored, world=world,
                 device=run.device, say=say, best=best)
    if log is not None:
        log.close()


# ------------------------------------------------------------------------------------------------ driver

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



def training_dataset(config: Config, prepared: Prepared) -> tuple["ray.data.Dataset", int]:
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
                  ds_config: dict, validate: bool = True, callbacks: list | None = None) -> "TorchTrainer":
    """A TorchTrainer (not started) for `config`. prepared_ref: the object-store ref of a `Prepared`;
    dataset: `ray_data.build_example_dataset` (n_examples rows); ds_config: `deepspeed_config`.
    validate=False (benchmarks) skips validation and the artifact in checkpoints. callbacks: Ray Train
    callbacks for the RunConfig (Tune's TuneReportCallback)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysparse.ray_data import fixed_block_order

    rc = config.ray
    storage, _ = run_location(config)
    resources = {"CPU": rc.cpus_per_worker}
    if rc.use_gpu:
        resources["GPU"] = 1
    loop_config = {"config": config.to_dict(), "prepared": prepared_ref, "n_examples": int(n_examples),
                   "ds_config": ds_config, "validate": validate}
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
        datasets={"train": fixed_block_order(dataset, config.train.seed)},
        # Shards by block order alone, not by the node that holds a block (which can differ between runs and
        # after a restart): the same examples reach the same rank in every run (issue 16). The rows are three
        # integers each, so the transfers this may add between nodes are small.
        dataset_config=DataConfig(enable_shard_locality=False),
    )


def connect(config: Config) -> None:
    """ray.init on ray.address, else the current cluster if there is one, else a new local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray.address or None)


def run_ray_training(config: Config, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train on the current Ray cluster; returns the summary of `raysparse.local.run_local` plus
    checkpoint/run paths. Writes <output>/artifact, <output>/summary.json and <output>/logs."""
    import ray

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
    if prepared.item_text_note:
        log(prepared.item_text_note)
    dataset, n_examples = training_dataset(config, prepared)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, ray.put(prepared), dataset, n_examples, ds_config)
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
    # The export is completed in artifact.tmp and only then put in place (`replace_directory`): a driver killed
    # while exporting leaves the previous <output>/artifact whole, never one half copied or without its
    # config or metrics (issue 16).
    artifact, tmp = out / "artifact", out / "artifact.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with best_ckpt.as_directory() as folder:
        shutil.copytree(Path(folder) / "artifact", tmp)

    # The artifact, evaluated in one process on the prepared split (the artifact itself has no held-out items).
    rec = Recommender.load(tmp)
    rec.builder = build_batches(rec.config, prepared.split, rec.builder.item_text)
    if config.train.choose_text_prior and apply_text_prior_choice(rec, prepared, log):
        write_config(tmp, rec.config)                      # chosen on validation, kept in the artifact's config
    val = validation_metrics(rec, prepared, "val", sampled=True)
    test, test_ranks = stage_metrics(rec, prepared, "test", sampled=True)
    best_epoch = int(best_metrics["epoch"])
    (tmp / "metrics.json").write_text(json.dumps({"val": val, "test": test, "best_epoch": best_epoch},
                                                 indent=2, default=float))
    replace_directory(tmp, artifact)
    restored = sorted({r["restored_from_epoch"] for r in history if "restored_from_epoch" in r})
    summary = {"history": history, "best_epoch": best_epoch, "val": val, "test": test,
               "test_ranks": test_ranks.tolist(),   # split.evaluated_users order, for paired comparisons
               "seconds": time.perf_counter() - t0, "data": prepared.split.stats, "validation": prepared.report,
               "run_dir": run_dir, "best_checkpoint": best_ckpt.path, "restored_from_epochs": restored,
               "deepspeed": ds_config}
    (out / "summary.json").write_text(strict_json(summary, indent=2))
    log(f"best epoch {best_epoch}: val ndcg@10={val.get(SELECT_METRIC, float('nan')):.4f}; "
        f"artifact: {artifact}; logs: {out / LOG_DIR}")
    return summary
