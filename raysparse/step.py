"""One training step, the optimizer set-up and the plain single-process training loop.

The Ray Train loop (raysparse.ray_train) runs the same `compute_loss` on the same batches, with a DeepSpeed
engine in place of the torch optimizer; everything else here is shared.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysparse.config import Config, TrainConfig

SELECT_METRIC = "val/overall/ndcg@10"  # what picks the best epoch, checkpoint and Tune trial


class MaskedLogSumExp(torch.autograd.Function):
    """logsumexp over each row's masked-in entries of (S, M) logits, computed in row chunks.

    The same value and gradient as `torch.logsumexp(logits.masked_fill(~mask, -inf), 1)`, without keeping
    a masked (S, M) copy for backward and with each chunk's passes in cache: with full softmax over ten
    thousand items the logits are the biggest tensor of a step and these passes the biggest cost after the
    matmul (torch profiler, a configs/accuracy.yaml step on 2 cores). A row with nothing masked in gives -inf
    and zero gradient. On GPU the rows go in one chunk (no cache to fit, and one kernel beats many small ones).
    """

    CHUNK_ROWS = 32   # 32 rows x 10k items x 4 bytes: ~1 MB, within a core's L2

    @staticmethod
    def _chunks(logits: torch.Tensor):
        step = logits.shape[0] if logits.is_cuda else MaskedLogSumExp.CHUNK_ROWS
        return (slice(lo, lo + step) for lo in range(0, logits.shape[0], max(step, 1)))

    @staticmethod
    def forward(ctx, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = logits.new_empty(logits.shape[0])
        for rows in MaskedLogSumExp._chunks(logits):
            out[rows] = torch.logsumexp(logits[rows].masked_fill(~mask[rows], float("-inf")), dim=1)
        ctx.save_for_backward(logits, mask, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, mask, out = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in MaskedLogSumExp._chunks(logits):
            # d lse / d logit = softmax over the masked-in entries, 0 elsewhere
            chunk = torch.sub(logits[rows], out[rows, None], out=grad[rows]).exp_()
            chunk.mul_(grad_out[rows, None]).masked_fill_(~mask[rows], 0.0)
        return grad, None


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse instead of unmapping it (Linux/glibc; elsewhere a no-op).

    A training step allocates and frees tensors of ~100 MB (the full-softmax logits and their gradient); by
    default glibc serves each from a fresh mmap, so every step pays page faults to zero new pages again. Keeping
    the memory in the heap: one epoch of configs/accuracy.yaml on ML latest-small 17.3 s -> 15.0 s (2 threads,
    1.78M -> 0.31M page faults a run), same losses. The cost: the process keeps its peak heap until it exits,
    which training processes do anyway. Returns whether the setting took.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):           # not glibc (e.g. musl): leave the allocator as it is
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 1 << 36) and mallopt(m_top_pad, 1 << 28))


def compute_loss(out: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """Mean loss over the targets from model outputs pos (N,), cand (S, M), neg_mask (S, M) and optionally
    target_row (N,), the row of cand/neg_mask each target is scored against (absent: N = S, row i for target i;
    sequence batches share a position's row between the next item and the one after it).

    softmax: cross-entropy of the target against its row's valid negatives (full or sampled softmax).
    bce:     binary cross-entropy, target = 1 and each valid negative = 0 (negatives averaged per example);
             with ratings as column/row weights this is DMF's normalized cross-entropy setting.
    """
    pos, cand, mask = out["pos"].float(), out["cand"].float(), out["neg_mask"]
    row = out.get("target_row")
    if loss == "softmax":
        # -log softmax of the target among [target, negatives], without concatenating a (N, 1 + M) copy.
        neg_lse = MaskedLogSumExp.apply(cand, mask)
        return (torch.logaddexp(pos, neg_lse if row is None else neg_lse[row]) - pos).mean()
    if loss == "bce":
        pos_loss = F.softplus(-pos)                                   # -log sigmoid(pos)
        neg_loss = (F.softplus(cand) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return (pos_loss + (neg_loss if row is None else neg_loss[row])).mean()
    raise ValueError(f"unknown loss {loss!r}")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Encoder weights train at text_lr, everything else at lr. Frozen weights are left out."""
    text, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (text if ".encoder." in f".{name}" else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr, "name": "dmf_fusion"}]
    if text:
        groups.append({"params": text, "lr": cfg.text_lr, "name": "text_encoder"})
    return groups


def warmup_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over warmup_ratio of the steps, then linear decay to 10%."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total_steps - warmup)
        return max(0.1, 1.0 - 0.9 * frac)

    return factor


def epochs_since_best(history: list[dict], metric: str) -> int:
    """Epochs since the best value of `metric` (higher is better) in per-epoch records; 0 if the last is best."""
    values = [record[metric] for record in history if metric in record]
    if not values:
        return 0
    return len(values) - 1 - int(np.argmax(values))


def steps_per_epoch(n_examples: int, cfg: TrainConfig, num_workers: int = 1) -> int:
    steps = math.ceil(n_examples / (cfg.batch_size_per_worker * num_workers))
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def train_local(config: Config, prepared, model: nn.Module, builder, log: Callable[[dict], None] = print,
                evaluate_fn: Callable[[nn.Module, int], dict] | None = None) -> list[dict]:
    """Train in this process with AdamW. Returns one record per epoch (loss, seconds, examples/s, metrics)."""
    tc = config.train
    keep_freed_memory()
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    n_examples = len(builder.training_examples(tc.example_mode)[0])
    total = steps_per_epoch(n_examples, tc) * tc.epochs // tc.grad_accum_steps
    optimizer = torch.optim.AdamW(param_groups(model, tc), weight_decay=tc.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(max(total, 1), tc.warmup_ratio))
    history = []
    for epoch in range(tc.epochs):
        model.train()
        t0, seen, losses = time.perf_counter(), 0, []
        for step, batch in enumerate(builder.iterate_epoch(tc.batch_size_per_worker, rng, tc.example_mode,
                                                           tc.max_steps_per_epoch)):
            loss = compute_loss(model(batch), tc.loss) / tc.grad_accum_steps
            loss.backward()
            if (step + 1) % tc.grad_accum_steps == 0:
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item() * tc.grad_accum_steps)
            seen += len(batch["user_idx"])
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "train_seconds": seconds, "examples_per_s": seen / max(seconds, 1e-9)}
        if evaluate_fn is not None:
            record.update(evaluate_fn(model, epoch + 1))
        history.append(record)
        log(record)
        if tc.patience and epochs_since_best(history, SELECT_METRIC) >= tc.patience:
            break
    return history
