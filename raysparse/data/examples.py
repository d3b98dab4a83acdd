"""Training examples and the tensors a model step reads.

A training example is (user_idx, target item, the user's history before it). With example_mode='prefix'
the history is the items that came *before* the target in time — exactly what the last-item protocol asks
the model to do at test time. With 'rest' it is every other training item. Either way the target is never
in its own input (tests check it).

Batch dict (B examples, N history entries, M candidate items, K column entries):
  user_idx (B,)             hist_items / hist_weights / hist_pos (N,)  hist_offsets (B,)   — newest first
  input_ids, attention_mask (B, L)                                    — fine-tuned text modes only
  cand_items (M,)           col_users / col_weights (K,)  col_offsets (M,)   — candidates' item columns
  target_pos (B,)           index of each target in cand_items
  target_col_weight (B,)    weight of (user, target) in the target's column, removed before scoring
  neg_mask (B, M)           True where the candidate is a negative (sampled, or every item when
                            negatives <= 0) that the user has never seen
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from raysparse.data.split import Split
from raysparse.data.text import ItemText


class BatchBuilder:
    """Turns user histories into model inputs. Holds the training matrix (for item columns and for masking
    seen items out of the negatives), so every worker builds identical batches from the same split."""

    def __init__(self, split: Split, item_text: ItemText | None, *, max_history: int, max_length: int,
                 negatives: int, with_tokens: bool, target_gap_max: int = 0, short_history_prob: float = 0.0,
                 short_history_ks: tuple[int, ...] = (1, 2, 3, 5)):
        self.split = split
        self.item_text = item_text
        self.max_history = max_history
        self.max_length = max_length
        self.negatives = negatives
        self.with_tokens = with_tokens
        self.target_gap_max = target_gap_max
        self.short_history_prob = short_history_prob
        self.short_history_ks = tuple(short_history_ks)
        self.seen = split.train_matrix(binary=False)          # (U, I) weights
        self.columns = self.seen.T.tocsr()                     # (I, U): DMF item inputs
        self.columns.sort_indices()

    # ---- examples ----------------------------------------------------------------------------------------
    def training_examples(self, mode: str = "prefix") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user_idx, target, position) for every training interaction that has a non-empty history.
        position = index of the target in the user's oldest-first training sequence."""
        lengths = self.split.history_lengths()
        users = np.repeat(np.arange(self.split.n_users), lengths)
        positions = np.arange(len(users)) - self.split.train_indptr[users]
        has_history = positions >= 1 if mode == "prefix" else lengths[users] >= 2
        return users[has_history], self.split.train_items[has_history], positions[has_history]

    def example_histories(self, users: np.ndarray, positions: np.ndarray, mode: str = "prefix",
                          rng: np.random.Generator | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Inputs of each example, newest first, at most max_history items; never contains the target.

        With `rng` and target_gap_max > 0 (prefix mode), the history of an example stops g in
        [0, target_gap_max] items before the target (keeping at least one item). At test time the input is
        the training history, so the test item comes two steps after it (the validation item sits between):
        training on gaps teaches the model that case too.
        """
        gaps = np.zeros(len(users), np.int64)
        if rng is not None and mode == "prefix" and self.target_gap_max > 0:
            gaps = np.minimum(rng.integers(0, self.target_gap_max + 1, size=len(users)), positions - 1)
        # Short-history augmentation: a sparse user at test time is a long-time user whose history was cut to
        # their k most recent items, not a user's first k items; cut some examples the same way.
        keep = np.full(len(users), self.max_history, np.int64)
        if rng is not None and self.short_history_prob > 0:
            short = rng.random(len(users)) < self.short_history_prob
            keep[short] = rng.choice(np.asarray(self.short_history_ks, np.int64), size=int(short.sum()))
        items, weights = [], []
        for u, p, g, n_keep in zip(users.tolist(), positions.tolist(), gaps.tolist(), keep.tolist()):
            lo, hi = self.split.train_indptr[u], self.split.train_indptr[u + 1]
            if mode == "prefix":
                idx = np.arange(lo, lo + p - g)
            else:
                idx = np.delete(np.arange(lo, hi), p)
            idx = idx[::-1][: n_keep]
            items.append(self.split.train_items[idx])
            weights.append(self.split.train_weights[idx])
        return items, weights

    def user_histories(self, users: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Full training history of known users (evaluation and serving), newest first."""
        items, weights = [], []
        for u in users:
            lo, hi = self.split.train_indptr[u], self.split.train_indptr[u + 1]
            idx = np.arange(lo, hi)[::-1][: self.max_history]
            items.append(self.split.train_items[idx])
            weights.append(self.split.train_weights[idx])
        return items, weights

    # ---- tensors ----------------------------------------------------------------------------------------
    def user_inputs(self, histories: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None = None
                    ) -> dict[str, torch.Tensor]:
        """History bag (+ token ids in fine-tuned text modes) for histories given newest first."""
        histories = [np.asarray(h, np.int64)[: self.max_history] for h in histories]
        if weights is None:
            weights = [np.ones(len(h), np.float32) for h in histories]
        lengths = np.array([len(h) for h in histories], np.int64)
        offsets = np.zeros(len(histories), np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        batch = {
            "hist_items": torch.from_numpy(np.concatenate(histories) if len(histories) else np.zeros(0, np.int64)),
            "hist_weights": torch.from_numpy(np.concatenate([np.asarray(w, np.float32)[: self.max_history]
                                                             for w in weights]).astype(np.float32)),
            "hist_pos": torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)),
            "hist_offsets": torch.from_numpy(offsets),
        }
        if self.with_tokens:
            batch.update(self.item_text.batch([h.tolist() for h in histories], self.max_length))
        return batch

    def item_bags(self, items: np.ndarray) -> dict[str, torch.Tensor]:
        cols = self.columns[items]
        return {"cand_items": torch.from_numpy(np.asarray(items, np.int64)),
                "col_users": torch.from_numpy(cols.indices.astype(np.int64)),
                "col_offsets": torch.from_numpy(cols.indptr[:-1].astype(np.int64)),
                "col_weights": torch.from_numpy(cols.data.astype(np.float32))}

    def collate(self, users: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray],
                weights: Sequence[np.ndarray] | None, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A training batch: inputs, candidates = targets + shared uniform negatives, masks."""
        users = np.asarray(users, np.int64)
        targets = np.asarray(targets, np.int64)
        if self.negatives <= 0 or self.negatives >= self.split.n_items:
            # Full softmax: every item is a candidate (what SASRec trains with); affordable for catalogues
            # of tens of thousands of items since item vectors are one EmbeddingBag pass.
            cand = np.arange(self.split.n_items)
            is_sampled = np.ones(len(cand), bool)
        else:
            sampled = np.unique(rng.integers(0, self.split.n_items, size=self.negatives))
            cand = np.union1d(targets, sampled)
            is_sampled = np.isin(cand, sampled)
        target_pos = np.searchsorted(cand, targets)
        seen = self.seen[users][:, cand].toarray() != 0
        neg_mask = is_sampled[None, :] & ~seen & (cand[None, :] != targets[:, None])
        batch = self.user_inputs(histories, weights)
        batch.update(self.item_bags(cand))
        batch["user_idx"] = torch.from_numpy(users)
        batch["target_pos"] = torch.from_numpy(target_pos.astype(np.int64))
        batch["target_col_weight"] = torch.from_numpy(
            np.asarray(self.seen[users, targets]).ravel().astype(np.float32))
        batch["neg_mask"] = torch.from_numpy(neg_mask)
        return batch

    def iterate_epoch(self, batch_size: int, rng: np.random.Generator, mode: str = "prefix",
                      max_steps: int = 0):
        """Shuffled training batches for one epoch (the plain-process loader)."""
        users, targets, positions = self.training_examples(mode)
        order = rng.permutation(len(users))
        steps = 0
        for start in range(0, len(order), batch_size):
            sel = order[start:start + batch_size]
            hist, w = self.example_histories(users[sel], positions[sel], mode, rng)
            yield self.collate(users[sel], targets[sel], hist, w, rng)
            steps += 1
            if max_steps and steps >= max_steps:
                return


def all_item_bags(builder: BatchBuilder, chunk: int = 4096):
    """Item column bags for every item, in chunks (for computing all item vectors once)."""
    for start in range(0, builder.split.n_items, chunk):
        yield builder.item_bags(np.arange(start, min(start + chunk, builder.split.n_items)))


