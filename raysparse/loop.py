"""The epoch loop of every training, in one process or as one of many workers: `train_epochs`.

What differs between trainings comes in as arguments: where an epoch's batches come from (`BatchBuilder`
in one process; a worker's Ray Data shard on Ray), how a batch is stepped (a `Stepper`:
`raysparse.step.PlainStepper` with torch AdamW, or `raysparse.engine.EngineStepper` with a DeepSpeed
engine), how an epoch is validated, and where its record goes (a log line; on Ray also a checkpoint and
`ray.train.report`). The rest is done here once for all: the epoch record (loss, examples/s, steady-state
rate, learning rates; summed or maxed over the workers), the epochs a restored run still has to train,
early stopping on validation.

Also here: `train_local` (one process: `raysparse train --local`), the collectives of the loop and of
distributed validation (torch.distributed, no Ray) and `EpochLog`, the log files of a distributed run.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from raysparse.config import Config, TrainConfig
from raysparse.data.examples import BatchBuilder
from raysparse.data.split import Split
from raysparse.metrics import ScoreFn, full_ranks, paired_z, strict_json
from raysparse.step import (SELECT_METRIC, USER_NDCG, Z_VS_BEST, PlainStepper, keep_freed_memory, stalled_epochs,
                            steps_per_epoch)

Batch = dict[str, torch.Tensor]
PROGRESS_EVERY_S = 15.0  # a progress line inside a long epoch, at most this often


class Stepper(Protocol):
    """How a batch is trained: `raysparse.step.PlainStepper` or `raysparse.engine.EngineStepper`."""

    optimizer: torch.optim.Optimizer  # its param_groups carry each group's name and current lr

    def start_epoch(self) -> None:
        """Training mode (dropout on) before an epoch's first batch; PlainStepper also restarts its count of
        accumulated batches there."""

    def step(self, batch: Batch) -> float:
        """Forward, loss, backward; an optimizer step at each accumulation boundary. Returns the loss."""


class BestEpoch:
    """The best validation so far (SELECT_METRIC) and that epoch's per-user NDCG@10, which each later epoch is
    paired with (Z_VS_BEST, for train.patience_z). A checkpoint keeps the per-user values (`save`, `load`), so a
    restored run pairs, and stops, exactly as the uninterrupted one would; without them (a checkpoint written
    before they were kept) the restored epochs count towards patience_z only once one of them is a new best."""

    FILE = "best_user_ndcg.npy"

    def __init__(self, history: Sequence[dict] = (), users: np.ndarray | None = None):
        self.value = max((r[SELECT_METRIC] for r in history if SELECT_METRIC in r), default=float("-inf"))
        self.users = users

    def observe(self, metrics: dict, users: np.ndarray | None) -> float | None:
        """This epoch's z against the best before it (None without per-user values on either side); then this
        epoch becomes the best if its SELECT_METRIC is higher."""
        z = None if users is None or self.users is None else paired_z(np.asarray(users, np.float64) - self.users)
        if SELECT_METRIC in metrics and metrics[SELECT_METRIC] > self.value:
            self.value, self.users = metrics[SELECT_METRIC], users
        return z

    def save(self, folder: Path) -> None:
        if self.users is not None:
            np.save(folder / self.FILE, np.asarray(self.users, np.float64))

    @classmethod
    def load(cls, folder: Path, history: Sequence[dict]) -> "BestEpoch":
        path = folder / cls.FILE
        return cls(history, np.load(path) if path.exists() else None)


def train_epochs(tc: TrainConfig, stepper: Stepper, epoch_batches: Callable[[int], Iterable[Batch]], *,
                 steps: int, batch_size: int, report: Callable[[dict, list[dict]], None],
                 evaluate: Callable[[int], dict] | None = None, history: Sequence[dict] = (), world: int = 1,
                 device: torch.device | str = "cpu", say: Callable[[str], None] = lambda line: None,
                 best: BestEpoch | None = None) -> list[dict]:
    """Train epochs len(history) + 1 .. tc.epochs; returns the history, one record per epoch.

    epoch_batches(epoch), epoch counted from 0: the epoch's batches, at most `steps` of at most `batch_size`
    examples (this worker's share of them on Ray). evaluate(epoch), counted from 1: metrics added to the
    epoch's record. report(record, history): after each epoch. history: the records of a restored run;
    the epochs after it carry `restored_from_epoch`. world, device: every worker runs this loop in step;
    examples and steady rates are summed over them, seconds maxed (torch.distributed on `device`). say:
    a progress line every PROGRESS_EVERY_S inside an epoch, and the early stop.
    Stops after tc.patience epochs without a better SELECT_METRIC or, with tc.patience_z, after tc.patience
    epochs in a row below the best by more than tc.patience_z standard errors: evaluate may return each
    validated user's NDCG@10 under USER_NDCG (popped; the record gets Z_VS_BEST, this epoch against the best
    before it). best: the best epoch so far (a restored run's, from its checkpoint), updated as epochs go; by
    default built from `history` without per-user values. Every worker holds the same validation record, so all
    of them stop at the same epoch.
    """
    history = list(history)
    restored_from = len(history) or None
    best = best if best is not None else BestEpoch(history)
    for epoch in range(len(history), tc.epochs):
        stepper.start_epoch()
        losses: list[float] = []
        examples = 0
        # When each step ends (the epoch's start first), in wall time and in this process's CPU time, which
        # other processes' load does not move.
        t0 = last_print = time.perf_counter()
        stamps, cpu_stamps = [t0], [time.process_time()]
        for step, batch in enumerate(epoch_batches(epoch)):
            losses.append(stepper.step(batch))
            examples += len(batch["user_idx"])
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            if stamps[-1] - last_print >= PROGRESS_EVERY_S:
                say(f"epoch {epoch + 1}: step {step + 1}/{steps} loss={np.mean(losses[-50:]):.4f} "
                    f"{examples * world / (stamps[-1] - t0):.0f} ex/s")
                last_print = stamps[-1]
        loss_sum, n_losses, n_examples = all_reduce([float(np.sum(losses)), float(len(losses)), float(examples)],
                                                    "sum", world, device)
        slowest = all_reduce([stamps[-1] - t0], "max", world, device)[0]
        steady, steady_cpu = all_reduce([steady_rate(stamps, batch_size), steady_rate(cpu_stamps, batch_size)],
                                        "sum", world, device)
        lrs = {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(stepper.optimizer.param_groups)}
        record: dict[str, Any] = {
            "epoch": epoch + 1, "loss": loss_sum / n_losses if n_losses else float("nan"), "train_seconds": slowest,
            "examples_per_s": n_examples / max(slowest, 1e-9), "steady_examples_per_s": steady,
            "steady_examples_per_cpu_s": steady_cpu, "steps": len(losses), "workers": world,
            **{f"lr/{name}": lr for name, lr in lrs.items()},
        }
        if restored_from is not None:
            record["restored_from_epoch"] = restored_from
        if evaluate is not None:
            metrics = evaluate(epoch + 1)
            record.update(metrics)
            z = best.observe(metrics, record.pop(USER_NDCG, None))
            if z is not None:
                record[Z_VS_BEST] = z
        history.append(record)
        report(record, history)
        if tc.patience and stalled_epochs(history, tc) >= tc.patience:
            why = (f"{tc.patience} epochs in a row below the best by more than {tc.patience_z:g} standard errors"
                   if tc.patience_z else f"no better {SELECT_METRIC} for {tc.patience} epochs")
            say(f"early stop after epoch {epoch + 1}: {why}")
            break
    return history


def train_local(config: Config, model: nn.Module, builder: BatchBuilder, log: Callable[[dict], None] = print,
                evaluate_fn: Callable[[nn.Module, int], dict] | None = None,
                say: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Train in this process with torch AdamW (`PlainStepper`) on `builder`'s shuffled batches. log(record)
    after each epoch; evaluate_fn(model, epoch) adds its metrics to the record; say(line): progress inside a
    long epoch and the early stop. Returns the records."""
    tc = config.train
    keep_freed_memory()
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)  # one stream for every epoch's order, negatives and augmentation
    steps = steps_per_epoch(len(builder.training_examples(tc.example_mode)[0]), tc.batch_size_per_worker,
                            tc.max_steps_per_epoch)
    stepper = PlainStepper(model, tc, steps * tc.epochs // tc.grad_accum_steps)
    return train_epochs(
        tc, stepper,
        lambda epoch: builder.iterate_epoch(tc.batch_size_per_worker, rng, tc.example_mode, tc.max_steps_per_epoch),
        steps=steps, batch_size=tc.batch_size_per_worker, report=lambda record, history: log(record),
        evaluate=None if evaluate_fn is None else (lambda epoch: evaluate_fn(model, epoch)), say=say)


def steady_rate(stamps: list[float], batch_size: int, skip: int = 2) -> float:
    """Examples/s of one process in steady state: batch / median step time, from the (skip+1)-th step on.
    `stamps` = when the first step began, then when each step ended. The median keeps the number stable on
    a shared machine, where other processes steal whole time slices."""
    durations = np.diff(np.asarray(stamps, np.float64))
    if len(durations) > skip + 1:
        durations = durations[skip:]
    return float(batch_size / np.median(durations)) if len(durations) else 0.0


# ------------------------------------------------------------------------------------------------ collectives

def all_reduce(values: list[float], op: str, world: int, device: torch.device | str) -> list[float]:
    """Each value summed (op "sum") or maxed ("max") over the `world` workers; as they are for one."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL (GPU workers) reduces device tensors
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_gather(value: Any, world: int) -> list:
    """Every worker's `value` (any picklable object), in rank order; [value] for one worker."""
    if world == 1:
        return [value]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def distributed_ranks(score_fn: ScoreFn, split: Split, users: np.ndarray, stage: str, batch_size: int, rank: int,
                      world: int) -> np.ndarray:
    """Full-ranking ranks (N,) of `users`: this worker ranks users[rank::world], then all ranks are gathered
    and put back in `users` order, so every worker holds exactly what one process would compute."""
    mine = full_ranks(score_fn, split, users[rank::world], stage, batch_size)
    if world == 1:
        return mine
    out = np.zeros(len(users), np.int64)
    for r, part in enumerate(all_gather(mine, world)):
        out[r::world] = part
    return out


# ------------------------------------------------------------------------------------------------ log files

class EpochLog:
    """Rank 0's log files of a distributed run, in `folder` (<output>/logs): metrics.jsonl, metrics.csv and
    TensorBoard events (tensorboard/), one record per epoch; workers.jsonl, one line per worker group that
    started (its first epoch, each worker's rank, host and pid), so a restart after a failure shows. On
    restore the epoch files are rewritten from the checkpoint's history and TensorBoard purges the events
    after the restored epoch."""

    def __init__(self, folder: Path, history: list[dict]):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where logs are written

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(strict_json(r) + "\n" for r in history))
        if history:
            pd.DataFrame(history).to_csv(folder / "metrics.csv", index=False)
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=len(history) + 1 if history else None)

    def add_workers(self, workers: list[dict], first_epoch: int) -> None:
        line = {"first_epoch": first_epoch, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "workers": workers}
        with open(self.folder / "workers.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def add(self, record: dict, history: list[dict]) -> None:
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(strict_json(record) + "\n")
        pd.DataFrame(history).to_csv(self.folder / "metrics.csv", index=False)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, float(value), record["epoch"])
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
