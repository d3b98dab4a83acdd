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

Sequence batches (example_mode='sequence') score S input positions (pred_row / pred_col) against the
candidates, each predicting its next item: target_pos / target_col_weight are (S,) and neg_mask is (S, M), one
row per position.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from raysparse.data.split import Split
from raysparse.data.text import ItemText
from raysparse.model.sequence import PAD


class BatchBuilder:
    """Turns user histories into model inputs. Holds the training matrix (for item columns and for masking
    seen items out of the negatives), so every worker builds identical batches from the same split."""

    def __init__(self, split: Split, item_text: ItemText | None, *, max_history: int, max_length: int,
                 negatives: int, with_tokens: bool, short_history_prob: float = 0.0,
                 short_history_ks: tuple[int, ...] = (1, 2, 3, 5), with_columns: bool = True):
        """with_columns=False: the model has no DMF item tower (residual fusion), so batches carry no item
        columns. A candidate's column is every user who has it: at MovieLens-25M size a popular item's holds
        ~100k users, and a step's candidates would slice millions of entries that nothing reads, a cost that
        grows with the number of users (`raysparse bench scale`)."""
        self.split = split
        self.item_text = item_text
        self.max_history = max_history
        self.max_length = max_length
        self.negatives = negatives
        self.with_tokens = with_tokens
        self.short_history_prob = short_history_prob
        self.short_history_ks = tuple(short_history_ks)
        self.seen = split.train_matrix(binary=False)          # (U, I) weights
        self.with_columns = with_columns
        self.columns = self.seen.T.tocsr() if with_columns else None    # (I, U): DMF item inputs
        if self.columns is not None:
            self.columns.sort_indices()

    # ---- examples ----------------------------------------------------------------------------------------
    def training_examples(self, mode: str = "prefix") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user_idx, target, position) for every training interaction that has a non-empty history.
        position = index of the target in the user's oldest-first training sequence.
        In 'sequence' mode an example is a window of the sequence, named by its last item (see
        `is_example`): one per max_history transitions."""
        lengths = self.split.history_lengths()
        users = np.repeat(np.arange(self.split.n_users), lengths)
        positions = np.arange(len(users)) - self.split.train_indptr[users]
        keep = is_example(positions, lengths[users], mode, self.max_history)
        return users[keep], self.split.train_items[keep], positions[keep]

    def training_batch(self, users: np.ndarray, targets: np.ndarray, positions: np.ndarray, mode: str,
                       rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The batch of these examples, in any mode (the plain loop and the Ray Train workers call this)."""
        if mode == "sequence":
            return self.sequence_batch(users, positions, rng)
        hist, weights = self.example_histories(users, positions, mode, rng)
        return self.collate(users, targets, hist, weights, rng)

    def example_histories(self, users: np.ndarray, positions: np.ndarray, mode: str = "prefix",
                          rng: np.random.Generator | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Inputs of each example, newest first, at most max_history items; never contains the target."""
        # Short-history augmentation: a sparse user at test time is a long-time user whose history was cut to
        # their k most recent items, not a user's first k items; cut some examples the same way.
        keep = np.full(len(users), self.max_history, np.int64)
        if rng is not None and self.short_history_prob > 0:
            short = rng.random(len(users)) < self.short_history_prob
            keep[short] = rng.choice(np.asarray(self.short_history_ks, np.int64), size=int(short.sum()))
        items, weights = [], []
        for u, p, n_keep in zip(users.tolist(), positions.tolist(), keep.tolist()):
            lo, hi = self.split.train_indptr[u], self.split.train_indptr[u + 1]
            if mode == "prefix":
                idx = np.arange(lo, lo + p)
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
        if self.columns is None:  # every column empty: the model reads no item columns
            empty = torch.zeros(0, dtype=torch.int64)
            return {"cand_items": torch.from_numpy(np.asarray(items, np.int64)), "col_users": empty,
                    "col_offsets": torch.zeros(len(items), dtype=torch.int64),
                    "col_weights": torch.zeros(0, dtype=torch.float32)}
        cols = self.columns[items]
        return {"cand_items": torch.from_numpy(np.asarray(items, np.int64)),
                "col_users": torch.from_numpy(cols.indices.astype(np.int64)),
                "col_offsets": torch.from_numpy(cols.indptr[:-1].astype(np.int64)),
                "col_weights": torch.from_numpy(cols.data.astype(np.float32))}

    def _candidates(self, users: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
                    row_targets: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate items (M,) = targets (N,) + shared uniform negatives; each target's index in them (N,);
        and neg_mask (len(users), M): the candidate is a sampled negative that the row's user has never seen
        and, with row_targets, not the row's own target. Sequence batches pass row_targets=False: a position's
        target is one of its user's training items, already masked as seen (and the (S, M) test costs time)."""
        if self.negatives <= 0 or self.negatives >= self.split.n_items:
            # Full softmax: every item is a candidate (what SASRec trains with); affordable for catalogues
            # of tens of thousands of items since item vectors are one EmbeddingBag pass.
            cand = np.arange(self.split.n_items)
            is_sampled = np.ones(len(cand), bool)
        else:
            sampled = np.unique(rng.integers(0, self.split.n_items, size=self.negatives))
            cand = np.union1d(targets, sampled)
            is_sampled = np.isin(cand, sampled)
        target_pos = np.searchsorted(cand, targets).astype(np.int64)
        # Rows repeat users (sequence batches: one row per prediction): read each user's row once.
        unique_users, row_of = np.unique(users, return_inverse=True)
        rows = self.seen[unique_users]
        seen = (rows if len(cand) == self.split.n_items else rows[:, cand]).toarray() != 0
        neg_mask = is_sampled[None, :] & ~seen[row_of]
        if row_targets:
            neg_mask &= cand[None, :] != targets[:, None]
        return cand, target_pos, neg_mask

    def collate(self, users: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray],
                weights: Sequence[np.ndarray] | None, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A training batch: inputs, candidates = targets + shared uniform negatives, masks."""
        users = np.asarray(users, np.int64)
        targets = np.asarray(targets, np.int64)
        cand, target_pos, neg_mask = self._candidates(users, targets, rng)
        batch = self.user_inputs(histories, weights)
        batch.update(self.item_bags(cand))
        batch["user_idx"] = torch.from_numpy(users)
        batch["target_pos"] = torch.from_numpy(target_pos)
        batch["target_col_weight"] = torch.from_numpy(
            np.asarray(self.seen[users, targets]).ravel().astype(np.float32))
        batch["neg_mask"] = torch.from_numpy(neg_mask)
        return batch

    def sequence_batch(self, users: np.ndarray, ends: np.ndarray, rng: np.random.Generator
                       ) -> dict[str, torch.Tensor]:
        """Windows of training sequences for one causal pass each (example_mode='sequence').

        A window ends at item `end` of the user's sequence and holds up to max_history + 1 items w; the inputs
        w[:-1] sit right-aligned in seq (B, L), L = the batch's longest window (<= max_history), PAD-filled on
        the left. Each input position t (pred_row, pred_col) predicts w[t + 1], the next item.
        With short_history_prob, a row is read as blocks of k items (window = k, k from data.cohort_ks), each
        position seeing 1..k recent items of its block: sparse users at test time.
        Negatives are shared as in `collate`; an item the user has seen is never a negative.
        """
        users = np.asarray(users, np.int64)
        n = len(users)
        # Each window's slice [start, stop) of the training items: its inputs and, last, its final target.
        lo, ends = self.split.train_indptr[users], np.asarray(ends, np.int64)
        start, stop = lo + np.maximum(0, ends - self.max_history), lo + ends + 1
        # As wide as the batch's longest window, not max_history: the inputs sit right-aligned and attention
        # reads only distances and blocks counted from the right end, so the PAD columns left of every window
        # change nothing (tested) but cost time. Short sequences (Amazon: ~6 training items a user) made most
        # of a 50-wide batch padding.
        length = max(int((stop - start).max(initial=1)) - 1, 1)
        seq = np.full((n, length), PAD, np.int64)
        seq_weights = np.zeros((n, length), np.float32)
        rows, cols, targets = [], [], []
        for b, (first, last) in enumerate(zip(start.tolist(), stop.tolist())):
            items = self.split.train_items[first:last]
            m = len(items) - 1                                  # inputs in this window
            seq[b, length - m:] = items[:-1]
            seq_weights[b, length - m:] = self.split.train_weights[first:last - 1]
            rows.append(np.full(m, b))
            cols.append(np.arange(length - m, length))
            targets.append(items[1:])
        window = np.zeros(n, np.int64)
        if self.short_history_prob > 0:
            short = rng.random(n) < self.short_history_prob
            window[short] = rng.choice(np.asarray(self.short_history_ks, np.int64), size=int(short.sum()))
        pred_row = np.concatenate(rows).astype(np.int64)
        pred_col = np.concatenate(cols).astype(np.int64)
        pred_target = np.concatenate(targets).astype(np.int64)
        position_user = users[pred_row]
        # One mask row per position: its user's seen items, which include the position's target.
        cand, target_pos, neg_mask = self._candidates(position_user, pred_target, rng, row_targets=False)
        batch = {"seq": torch.from_numpy(seq), "seq_weights": torch.from_numpy(seq_weights),
                 "window": torch.from_numpy(window), "user_idx": torch.from_numpy(users),
                 "pred_row": torch.from_numpy(pred_row), "pred_col": torch.from_numpy(pred_col),
                 "target_pos": torch.from_numpy(target_pos),
                 "target_col_weight": torch.from_numpy(
                     np.asarray(self.seen[position_user, pred_target]).ravel().astype(np.float32)),
                 "neg_mask": torch.from_numpy(neg_mask)}
        batch.update(self.item_bags(cand))
        return batch

    def iterate_epoch(self, batch_size: int, rng: np.random.Generator, mode: str = "prefix",
                      max_steps: int = 0):
        """Shuffled training batches for one epoch (the plain-process loader)."""
        users, targets, positions = self.training_examples(mode)
        order = rng.permutation(len(users))
        steps = 0
        for start in range(0, len(order), batch_size):
            sel = order[start:start + batch_size]
            yield self.training_batch(users[sel], targets[sel], positions[sel], mode, rng)
            steps += 1
            if max_steps and steps >= max_steps:
                return


def is_example(positions: np.ndarray, lengths: np.ndarray, mode: str, max_history: int) -> np.ndarray:
    """Which (position in the user's sequence, sequence length) pairs are training examples.
    prefix: every item with at least one item before it. rest: every item of a user with >= 2 items.
    sequence: the last item of each window, windows taken from the newest end backwards, each holding
    max_history transitions and sharing one item with the next (every transition is predicted once)."""
    if mode == "prefix":
        return positions >= 1
    if mode == "rest":
        return lengths >= 2
    return (positions >= 1) & ((lengths - 1 - positions) % max_history == 0)


def all_item_bags(builder: BatchBuilder, chunk: int = 4096):
    """Item column bags for every item, in chunks (for computing all item vectors once)."""
    for start in range(0, builder.split.n_items, chunk):
        yield builder.item_bags(np.arange(start, min(start + chunk, builder.split.n_items)))


