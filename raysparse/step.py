"""One training step: the loss (`compute_loss`), the optimizer's param groups and learning-rate schedule, and
`PlainStepper`, a step with torch AdamW in this process. `raysparse.engine.EngineStepper` takes the same step
through a DeepSpeed engine with the same groups and schedule; `raysparse.loop.train_epochs` runs either.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysparse.config import TrainConfig

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
    """Mean loss over the targets from model outputs pos (N,), cand (N, M) and neg_mask (N, M): row i holds
    target i's candidates.

    softmax: cross-entropy of the target against its row's valid negatives (full or sampled softmax).
    bce:     binary cross-entropy, target = 1 and each valid negative = 0 (negatives averaged per example);
             with ratings as column/row weights this is DMF's normalized cross-entropy setting.
    """
    pos, cand, mask = out["pos"].float(), out["cand"].float(), out["neg_mask"]
    if loss == "softmax":
        # -log softmax of the target among [target, negatives], without concatenating a (N, 1 + M) copy.
        neg_lse = MaskedLogSumExp.apply(cand, mask)
        return (torch.logaddexp(pos, neg_lse) - pos).mean()
    if loss == "bce":
        pos_loss = F.softplus(-pos)                                   # -log sigmoid(pos)
        neg_loss = (F.softplus(cand) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return (pos_loss + neg_loss).mean()
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


class PlainStepper:
    """One training step in this process with torch AdamW: the param groups above, warm-up + decay over
    `total_steps` optimizer steps, gradients accumulated over train.grad_accum_steps batches (counted from each
    epoch's start) and clipped at train.grad_clip. A `raysparse.loop.Stepper`."""

    def __init__(self, model: nn.Module, tc: TrainConfig, total_steps: int):
        self.model, self.tc = model, tc
        self.optimizer = torch.optim.AdamW(param_groups(model, tc), weight_decay=tc.weight_decay, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_decay(max(total_steps, 1), tc.warmup_ratio))
        self.batches = 0  # batches stepped since the epoch began

    def start_epoch(self) -> None:
        self.model.train()
        self.batches = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        tc = self.tc
        loss = compute_loss(self.model(batch), tc.loss) / tc.grad_accum_steps
        loss.backward()
        self.batches += 1
        if self.batches % tc.grad_accum_steps == 0:
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item() * tc.grad_accum_steps


def epochs_since_best(history: list[dict], metric: str) -> int:
    """Epochs since the best value of `metric` (higher is better) in per-epoch records; 0 if the last is best."""
    values = [record[metric] for record in history if metric in record]
    if not values:
        return 0
    return len(values) - 1 - int(np.argmax(values))


# Each epoch's validation against the best epoch before it, in standard errors of the per-user paired difference of
# NDCG@10 (`raysparse.metrics.paired_z`); in the epoch record when the validation gave per-user values (USER_NDCG).
Z_VS_BEST = "z_vs_best"
USER_NDCG = "per_user/ndcg@10"   # what an epoch's validation may return beside its metrics: (N,) per user, popped


def epochs_significantly_worse(history: list[dict], z: float) -> int:
    """The epochs at the end of `history` in a row whose validation is below the best epoch before them by more
    than `z` standard errors (Z_VS_BEST < -z). An epoch without the figure (no per-user validation, or a
    checkpoint without the best epoch's values) does not count and ends the run of epochs."""
    count = 0
    for record in reversed(history):
        if not record.get(Z_VS_BEST, 0.0) < -z:
            break
        count += 1
    return count


def stalled_epochs(history: list[dict], tc: TrainConfig) -> int:
    """What train.patience counts: epochs without a better validation NDCG@10 or, with train.patience_z > 0,
    epochs in a row that are significantly below the best one."""
    if tc.patience_z > 0:
        return epochs_significantly_worse(history, tc.patience_z)
    return epochs_since_best(history, SELECT_METRIC)


def steps_per_epoch(n_examples: int, batch_size: int, max_steps: int = 0) -> int:
    """Batches in one pass over `n_examples`, capped at `max_steps` (train.max_steps_per_epoch; 0: no cap)."""
    steps = math.ceil(n_examples / batch_size)
    return min(steps, max_steps) if max_steps else steps
