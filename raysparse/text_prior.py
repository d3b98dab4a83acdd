"""The zero-shot text prior blended into our scores, and its choice on validation.

A user's input (history) of n items gives the trained model little to go on when n is small, while the text of
even one item says a lot: the 'EASE + text' baseline wins the sparse cohort that way. The prior matches each
item's frozen text embedding against the input's, in one of two forms (text_prior_form): 'mean', the cosine with
the mean text of the input's items; 'max', the best cosine with any one input item (a nearest-neighbour match
in text, which keeps each of an input's topics where the mean blurs them). It is z-standardised per user like
the model's scores and added with weight w(n) = text_prior * h / (h + n) (h = text_prior_items; 0: constant).
All three are chosen on validation after training (`choose_text_prior`); the test split decides nothing.
'max' replaces 'mean' only when it wins by more than validation noise (PRIOR_FORM_MIN_Z).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from raysparse.config import PRIOR_FORMS
from raysparse.data.split import Split
from raysparse.metrics import exclusion_mask, metrics_from_ranks, paired_z, ranks_from_scores, user_ndcg

PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
PRIOR_ITEMS = (0.0, 2.0, 8.0)
# How far a later form's best point must beat the choice before it, in standard errors of the paired per-user
# validation NDCG difference (one-sided 5%). Without it a few hundred validation users pick 'max' by chance: on
# ML latest-small (610 users) it won on two of three seeds (z 0.56 and 0.76) and lost on test on all three,
# while on Amazon Scientific (8,317 users) it won at z 2.0-4.5 and on test on every seed (docs/ACCURACY.md).
PRIOR_FORM_MIN_Z = 1.645


def zscore_rows(scores: torch.Tensor) -> torch.Tensor:
    """(B, I) -> (B, I): per row (user), subtract the mean over items and divide by the std (a constant row -> 0).
    Puts unbounded model scores and cosines on one footing (also the 'EASE + text' baseline's blend)."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, unbiased=False, keepdim=True)
    return (scores - mean) / torch.where(std > 0, std, torch.ones_like(std))


def prior_weights(lengths: Sequence[int], weight: float, items: float) -> torch.Tensor:
    """(B, 1) w(n) = weight * items / (items + n); items = 0 gives `weight` for every n."""
    n = torch.as_tensor(np.asarray(lengths, np.float32))
    w = torch.full_like(n, weight) if items <= 0 else weight * items / (items + n)
    return w[:, None]


def user_text_vectors(unit_item_text: torch.Tensor, histories: Sequence[np.ndarray], max_items: int) -> torch.Tensor:
    """(B, H) each input's mean item text (its newest `max_items`) at unit length; a zero row for an empty input.
    histories: newest first. unit_item_text: (I, H) L2-normalised item text embeddings."""
    rows = []
    for h in histories:
        h = np.array(h[:max_items], dtype=np.int64)      # a copy: inputs arrive as reversed views
        rows.append(unit_item_text[torch.as_tensor(h)].mean(0) if len(h) else
                    torch.zeros(unit_item_text.shape[1], dtype=unit_item_text.dtype))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def text_scores(unit_item_text: torch.Tensor, histories: Sequence[np.ndarray], max_items: int,
                form: str = "mean") -> torch.Tensor:
    """(B, I) the standardised prior of each input (its newest `max_items` items) for every item: form 'mean',
    the cosine between the input's mean item text and the item's; 'max', the item's highest cosine with any one
    input item (an empty input: a zero row). histories: newest first. unit_item_text: (I, H) L2-normalised."""
    if form == "mean":
        return zscore_rows(user_text_vectors(unit_item_text, histories, max_items) @ unit_item_text.T)
    if form != "max":
        raise ValueError(f"text prior form {form!r} is not one of {', '.join(PRIOR_FORMS)}")
    rows = []
    for h in histories:   # one input at a time: (n, I) cosines, where a batch would hold (B, n, I)
        h = np.array(h[:max_items], dtype=np.int64)      # a copy: inputs arrive as reversed views
        rows.append((unit_item_text[torch.as_tensor(h)] @ unit_item_text.T).max(0).values if len(h) else
                    unit_item_text.new_zeros(unit_item_text.shape[0]))
    return zscore_rows(torch.stack(rows))


def blend(model_scores: torch.Tensor, prior: torch.Tensor, lengths: Sequence[int], weight: float,
          items: float) -> torch.Tensor:
    return zscore_rows(model_scores) + prior_weights(lengths, weight, items) * prior


def input_lengths(histories: Sequence[np.ndarray], max_items: int) -> list[int]:
    """n in w(n): the input's length, capped where the model's input is (max_history)."""
    return [min(len(h), max_items) for h in histories]


def choose_text_prior(score_fn: Callable, prior_fn: Callable, split: Split, users: np.ndarray, max_items: int,
                      batch_size: int = 256, k: int = 10, forms: Sequence[str] = PRIOR_FORMS
                      ) -> tuple[tuple[float, float, str], dict]:
    """The (text_prior, text_prior_items, text_prior_form) with the best validation NDCG@k over `users`, and
    every grid point's. score_fn(user_idx, histories_oldest_first) -> (B, I) model scores without the prior;
    prior_fn(histories_newest_first, form) -> (B, I) standardised text scores. One scoring pass: each batch is
    scored once and ranked under every grid point. Within a form, the best point wins (ties keep the earlier:
    weight 0 first, which belongs to the first form); a later form's best replaces the choice only when its
    per-user NDCG beats the choice's by PRIOR_FORM_MIN_Z paired standard errors."""
    grid = [(0.0, 0.0, forms[0])] + [(w, h, f) for f in forms for w in PRIOR_WEIGHTS if w > 0 for h in PRIOR_ITEMS]
    ranks: dict[tuple[float, float, str], list[np.ndarray]] = {point: [] for point in grid}
    targets_all = split.targets("val")
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        inputs = split.model_inputs(batch, "val")
        with torch.no_grad():
            model = zscore_rows(torch.as_tensor(score_fn(batch, inputs)).float())
            newest_first = [np.asarray(h)[::-1] for h in inputs]
            priors = {form: prior_fn(newest_first, form) for form in forms}
        mask = exclusion_mask(split, batch, "val")
        targets = torch.as_tensor(targets_all[batch])
        lengths = input_lengths(inputs, max_items)
        for weight, items, form in grid:
            scores = model + prior_weights(lengths, weight, items) * priors[form] if weight else model
            ranks[(weight, items, form)].append(ranks_from_scores(scores, targets, mask).numpy())
    table = {point: metrics_from_ranks(np.concatenate(r) if r else np.zeros(0), ks=(k,)).get(f"ndcg@{k}", 0.0)
             for point, r in ranks.items()}

    def best_of(form: str) -> tuple[float, float, str]:
        points = [p for p in grid if p[2] == form]
        return max(points, key=lambda p: (table[p], -grid.index(p)))

    choice = best_of(forms[0])
    for form in forms[1:]:
        challenger = best_of(form)
        gain = (user_ndcg(np.concatenate(ranks[challenger]), k) - user_ndcg(np.concatenate(ranks[choice]), k)
                if ranks[choice] else np.zeros(0))
        if paired_z(gain) >= PRIOR_FORM_MIN_Z:
            choice = challenger
    return choice, table

