"""Ranking metrics for one held-out item per user, full ranking and the sampled protocol.

Every model is scored from the same input per user and stage (`Split.model_input`: leave-one-out, the
validation item folded in at test) and ranks every item outside that input.

`rank` is 1-based and pessimistic about ties: an item scored equal to the target counts as ranked above it,
so a model that scores everything the same gets the worst rank, not the best.
HR@K = [rank <= K]; with a single relevant item Recall@K equals HR@K; NDCG@K = 1/log2(rank + 1) if
rank <= K else 0; MRR = 1/rank (no cut-off).
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch

from raysparse.data.split import Split

KS = (5, 10, 20)
SAMPLED_NEGATIVES = 100

# (user_idx (B,), each user's input items oldest first (Split.model_input)) -> scores (B, I) over every item.
# The input is the protocol's: the training history at validation, + the validation item at test.
ScoreFn = Callable[[np.ndarray, list[np.ndarray]], torch.Tensor]


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor, exclude_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """1-based rank of each target among non-excluded items. scores (B, I), targets (B,), mask (B, I) bool."""
    scores = scores.float()
    target_scores = scores.gather(1, targets[:, None])
    beats = scores >= target_scores
    if exclude_mask is not None:
        beats &= ~exclude_mask
    beats.scatter_(1, targets[:, None], False)  # the target does not outrank itself
    return beats.sum(1) + 1


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Mean HR@K, NDCG@K, Recall@K and MRR over users. ranks (N,), 1-based."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {"users": int(len(ranks))}
    if len(ranks) == 0:
        return out
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def user_ndcg(ranks, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k (N,) from the 1-based ranks (N,) of their single held-out item; the mean is
    `metrics_from_ranks`' ndcg@k."""
    ranks = np.asarray(ranks, np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def paired_z(differences) -> float:
    """Mean of per-user differences of one metric (the same users, two models or two epochs) over its standard
    error: how many standard errors the first is above (> 0) or below (< 0) the second. Two epochs or two scorings
    of the same users are strongly correlated user by user, so this paired error is several times smaller than
    either mean's own. 0 for no users or no mean difference; +-inf when the error is 0 (every user moved alike, or
    a single user)."""
    differences = np.asarray(differences, np.float64)
    n = len(differences)
    if n == 0:
        return 0.0
    mean = float(differences.mean())
    error = float(differences.std(ddof=1)) / np.sqrt(n) if n > 1 else 0.0
    if error == 0.0:
        return 0.0 if mean == 0.0 else float(np.sign(mean) * np.inf)
    return mean / error


def strict_json(value, indent: int | None = None) -> str:
    """JSON text of records for files others read (metrics.jsonl, summary.json): a non-finite float (z_vs_best
    is +-inf when every validation user moved alike) becomes null, since JSON has no Infinity or NaN and strict
    readers (JavaScript's JSON.parse, jq, Go, Rust's serde_json) refuse the tokens Python writes for them.
    numpy scalars become numbers. The in-memory records, and the checkpoint's own state file, keep the value."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        return v
    return json.dumps(clean(value), indent=indent, default=float, allow_nan=False)


def full_ranks(score_fn: ScoreFn, split: Split, users: np.ndarray, stage: str, batch_size: int = 256) -> np.ndarray:
    """Full-ranking ranks of each user's held-out item, scored from `split.model_input` (the training history,
    + the validation item at test); everything in that input is excluded from the ranking."""
    return stage_ranks(score_fn, split, users, stage, batch_size)[0]


def stage_ranks(score_fn: ScoreFn, split: Split, users: np.ndarray, stage: str, batch_size: int = 256,
                candidates: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(full-ranking ranks (N,), sampled ranks (N,) or None) of each user's held-out item from one scoring pass:
    the full ranking as in `full_ranks`; where `candidates` (N, n) are given (`sampled_candidates`), also the
    held-out item's rank among itself + its row of candidates (the sampled protocol). One pass because scoring
    is the cost: a model with the text prior computes it per batch."""
    targets_all = split.targets(stage)
    ranks = np.zeros(len(users), np.int64)
    sampled = None if candidates is None else np.zeros(len(users), np.int64)
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        with torch.no_grad():
            scores = torch.as_tensor(score_fn(batch, split.model_inputs(batch, stage))).float()
        mask = exclusion_mask(split, batch, stage)
        targets = torch.as_tensor(targets_all[batch])
        ranks[start:start + len(batch)] = ranks_from_scores(scores, targets, mask).numpy()
        if sampled is not None:
            cols = torch.as_tensor(np.concatenate([targets_all[batch][:, None], candidates[start:start + len(batch)]],
                                                  1))
            sampled[start:start + len(batch)] = ranks_from_scores(
                scores.gather(1, cols), torch.zeros(len(batch), dtype=torch.long)).numpy()
    return ranks, sampled


def exclusion_mask(split: Split, users: np.ndarray, stage: str) -> torch.Tensor:
    mask = torch.zeros(len(users), split.n_items, dtype=torch.bool)
    for row, u in enumerate(users):
        mask[row, torch.as_tensor(split.exclusions(int(u), stage))] = True
    return mask


def sampled_candidates(split: Split, users: np.ndarray, stage: str, n: int = SAMPLED_NEGATIVES,
                       seed: int = 0) -> np.ndarray:
    """(N, n) seeded items per user, none seen in training nor the held-out items. Same for every model."""
    rng = np.random.default_rng(seed + (0 if stage == "val" else 1))
    out = np.zeros((len(users), n), np.int64)
    for row, u in enumerate(users):
        banned = set(split.history(int(u)).tolist()) | {int(split.val_item[u]), int(split.test_item[u])}
        if split.n_items - len(banned) < n:
            raise ValueError(f"sampled protocol needs {n} unseen items per user; catalogue has {split.n_items}.")
        picked: list[int] = []
        while len(picked) < n:
            for c in rng.integers(0, split.n_items, size=2 * n).tolist():
                if c not in banned:
                    banned.add(c)
                    picked.append(c)
                    if len(picked) == n:
                        break
        out[row] = picked
    return out


def cohort_groups(split: Split, users: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over `users`: overall, warm (outside the cohort), cohort, and cohort_k{k} per k."""
    k = split.cohort_k[users]
    groups = {"overall": np.ones(len(users), bool), "warm": k == 0, "cohort": k > 0}
    for value in sorted(set(k[k > 0].tolist())):
        groups[f"cohort_k{value}"] = k == value
    return groups


def summarize(ranks: np.ndarray, split: Split, users: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, dict]:
    return {name: metrics_from_ranks(ranks[mask], ks) for name, mask in cohort_groups(split, users).items()}


def evaluate(score_fn: ScoreFn, split: Split, stage: str = "val", ks: tuple[int, ...] = KS, batch_size: int = 256,
             sampled: bool = True, seed: int = 0, users: np.ndarray | None = None) -> dict[str, dict]:
    """Full-ranking metrics by cohort group, and (labelled 'sampled100/...') the sampled protocol."""
    return evaluate_ranks(score_fn, split, stage, ks, batch_size, sampled, seed, users)[0]


def evaluate_ranks(score_fn: ScoreFn, split: Split, stage: str = "val", ks: tuple[int, ...] = KS,
                   batch_size: int = 256, sampled: bool = True, seed: int = 0, users: np.ndarray | None = None
                   ) -> tuple[dict[str, dict], np.ndarray]:
    """`evaluate`'s metrics and the full-ranking rank of each user's held-out item (`users` order; default
    split.evaluated_users), for paired comparisons without scoring the users again. One scoring pass serves
    both protocols."""
    users = split.evaluated_users if users is None else users
    candidates = None
    if sampled:
        # Tiny catalogues cannot supply 100 unseen items per user; the label says how many were used.
        n_sampled = min(SAMPLED_NEGATIVES, split.n_items - int(split.history_lengths()[users].max(initial=0)) - 2)
        if n_sampled >= 1:
            candidates = sampled_candidates(split, users, stage, n=n_sampled, seed=seed)
    full, sampled_rank = stage_ranks(score_fn, split, users, stage, batch_size, candidates)
    result = summarize(full, split, users, ks)
    if sampled_rank is not None:
        s = summarize(sampled_rank, split, users, ks)
        result.update({f"sampled{candidates.shape[1]}/{name}": m for name, m in s.items()})
    return result, full


def flatten(result: dict[str, dict], prefix: str = "") -> dict[str, float]:
    """{"overall": {"ndcg@10": x}} -> {"<prefix>overall/ndcg@10": x}."""
    return {f"{prefix}{group}/{name}": value for group, metrics in result.items() for name, value in metrics.items()}
