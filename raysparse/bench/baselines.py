"""Baselines for the leave-one-out full-ranking protocol: popularity, EASE, iALS, text zero-shot, EASE + text,
SASRec, SASRec + our text prior.

Every baseline follows one small contract so the bench can treat them alike:

    model = Baseline(**params).fit(split)          # reads split.train_* only, never val_item / test_item
    model.score(user_idx, histories)               # (B,), B input histories -> (B, I) float32 scores
    Baseline.tune(split, grid) -> (params, ndcg)   # grid search by validation NDCG@10 (overall group)

`histories` is what each user reads under the leave-one-out protocol (`Split.model_input`, oldest first): the
training history at validation, the training history + the validation item at test. Every model scores from
it alone (EASE: that row times B; iALS: a user vector re-solved from that row; SASRec: that sequence; text: the
mean of its items' embeddings), so all rows of the bench get the same input. `raysparse.metrics.evaluate`
removes the input items from the ranking, so `score` returns raw scores for all items.
Tuning calls `evaluate(..., stage="val")` only: the test
targets decide nothing (tests/test_baselines.py checks this with a split that raises on any test access).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import time
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from raysparse.data.split import Split
from raysparse.metrics import evaluate, evaluate_ranks
from raysparse.text_prior import blend, choose_text_prior, input_lengths, text_scores, zscore_rows

# implicit (and threadpoolctl, which it brings) are imported inside IALS: an optional dependency
# (pip install raysparse[bench]) that the other baselines do not need.

log = logging.getLogger(__name__)

Grid = Mapping[str, Sequence[Any]]  # hyper-parameter name -> candidate values; the search is their product


class Baseline(Protocol):
    fit_seconds: float  # wall time of the last fit (SASRec: including its per-epoch validation)

    def fit(self, split: Split, stage_for_tuning: str | None = "val") -> "Baseline": ...

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor: ...


def validation_ndcg10(model: Baseline, split: Split) -> float:
    """Full-ranking NDCG@10 over all evaluated users on the validation items: the one tuning criterion."""
    return float(evaluate(model.score, split, "val", ks=(10,), sampled=False)["overall"]["ndcg@10"])


def grid_search(build: Callable[..., Baseline], split: Split, grid: Grid) -> tuple[dict, float, Baseline]:
    """Fit `build(**params)` for every point of `grid`; keep the best by validation NDCG@10.

    Ties keep the earlier grid point, so the result does not depend on floating-point noise in a later one.
    Returns (best params, best validation NDCG@10, the fitted best model).
    """
    best: tuple[dict, float, Baseline] | None = None
    names = list(grid)
    for values in itertools.product(*(grid[name] for name in names)):
        params = dict(zip(names, values))
        start = time.perf_counter()
        model = build(**params).fit(split)
        ndcg = validation_ndcg10(model, split)
        log.info("%s %s: val ndcg@10 %.4f (%.1fs)", type(model).__name__, params, ndcg, time.perf_counter() - start)
        if best is None or ndcg > best[1]:
            best = (params, ndcg, model)
    assert best is not None, "grid has no points"
    return best


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with n intra-op threads, then restore the caller's setting (it is process-global).

    The default is the 2 cores of the bench machine; on a loaded machine or for tiny models 1 is much faster,
    because OpenMP threads waiting on each other at every op boundary cost more than they compute.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_val_only(stage_for_tuning: str | None) -> None:
    if stage_for_tuning not in ("val", None):
        raise ValueError(f"stage_for_tuning must be 'val' (or None for no early stopping), got "
                         f"{stage_for_tuning!r}; the test split never decides anything.")


def _check_fitted(model: object, attribute: str) -> None:
    if getattr(model, attribute, None) is None:
        raise RuntimeError(f"{type(model).__name__} is not fitted; call .fit(split) before .score(user_idx, "
                           f"histories).")


def history_rows(histories: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """(B, I) binary CSR rows of the given input histories (item indices)."""
    lengths = [len(h) for h in histories]
    indptr = np.zeros(len(histories) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate([np.asarray(h, np.int64) for h in histories]) if histories else np.zeros(0, np.int64)
    rows = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(histories), n_items))
    rows.sum_duplicates()
    rows.data[:] = 1.0
    return rows


# --------------------------------------------------------------------------------------------------------------
# Popularity


class Popularity:
    """Every user gets the same scores: how many training users consumed each item."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # (I,) float32

    def fit(self, split: Split, stage_for_tuning: str | None = "val") -> "Popularity":
        _check_val_only(stage_for_tuning)
        start = time.perf_counter()
        # Training items only: counting val/test items would leak the held-out interactions into every score.
        self.counts = torch.as_tensor(np.bincount(split.train_items, minlength=split.n_items), dtype=torch.float32)
        self.fit_seconds = time.perf_counter() - start
        return self

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """user_idx (B,) -> (B, I); the input does not matter."""
        _check_fitted(self, "counts")
        return self.counts.expand(len(user_idx), -1).clone()

    @classmethod
    def tune(cls, split: Split, grid: Grid | None = None) -> tuple[dict, float]:
        params, ndcg, _ = grid_search(cls, split, grid or {})
        return params, ndcg


# --------------------------------------------------------------------------------------------------------------
# EASE


EASE_GRID = {"lam": [10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0]}


def ease_weights(gram: np.ndarray, lam: float, overwrite: bool = False) -> np.ndarray:
    """EASE closed form (Steck, WWW 2019, https://arxiv.org/abs/1905.03375): P = (G + λI)⁻¹, B = I - P / diag(P).

    gram (n, n) = XᵀX: the full symmetric matrix, or, Fortran-ordered, only its upper triangle (`upper_gram`);
    returns B (n, n) in gram's dtype with B_ij = -P_ij / P_jj and diag(B) = 0. Cholesky (potrf + potri) instead
    of a general inverse: G + λI is symmetric positive definite, and this is about 5x faster than np.linalg.inv
    at n = 9k on 2 cores. overwrite=True reuses gram's memory.
    """
    if not lam > 0:
        raise ValueError(f"EASE lam must be > 0 (it makes XᵀX + lam·I invertible), got {lam!r}.")
    a = gram if overwrite else gram.copy(order="K")   # "K": a Fortran-ordered upper triangle stays one
    if a.flags.c_contiguous:
        a = a.T  # the same symmetric matrix, Fortran-ordered, so LAPACK works in place instead of copying
    a[np.diag_indices_from(a)] += lam
    potrf, potri = scipy.linalg.get_lapack_funcs(("potrf", "potri"), (a,))
    chol, info = potrf(a, lower=False, overwrite_a=True, clean=True)
    assert info == 0, f"potrf failed (info={info}); gram must be positive semi-definite"
    p, info = potri(chol, lower=False, overwrite_c=True)
    assert info == 0, f"potri failed (info={info})"
    mirror_upper(p)  # potri fills the upper triangle only
    diag = np.diag(p).copy()
    p /= -diag[None, :]
    p[np.diag_indices_from(p)] = 0.0
    return p


def mirror_upper(p: np.ndarray, block: int = 1024) -> None:
    """Copy the upper triangle of the square matrix p onto its lower triangle, in place, a block of columns at a
    time. `np.triu(p) + np.triu(p, 1).T` gives the same matrix but allocates two more n x n ones: 5.4 GB besides
    p's 2.7 GB for a 26k-item catalogue (UniSRec's Amazon Office), with two baseline jobs side by side."""
    n = p.shape[0]
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        square = p[lo:hi, lo:hi]
        square[...] = np.triu(square) + np.triu(square, 1).T
        p[hi:, lo:hi] = p[lo:hi, hi:].T


class EASE:
    """Item-item linear autoencoder with a zero diagonal; scores = X B.

    Only items seen in training get rows/columns of B (an unseen item's column would be all zero anyway),
    which keeps the inverse as small as the data allows.
    """

    def __init__(self, lam: float = 500.0, dtype: type = np.float32):
        self.lam = lam
        self.dtype = dtype
        self.weights: np.ndarray | None = None   # (A, A) B restricted to the active items
        self.active_items: np.ndarray | None = None  # (A,) item_idx of B's rows/columns
        self.n_items = 0

    def fit(self, split: Split, stage_for_tuning: str | None = "val") -> "EASE":
        _check_val_only(stage_for_tuning)
        start = time.perf_counter()
        x = split.train_matrix(binary=True)
        self.n_items = split.n_items
        self.active_items = np.flatnonzero(x.getnnz(axis=0) > 0)
        self.weights = ease_weights(upper_gram(x[:, self.active_items].tocsr(), self.dtype), self.lam,
                                    overwrite=True)
        self.fit_seconds = time.perf_counter() - start
        return self

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """user_idx (B,), input histories -> (B, I): each input row times B. Items unseen in training have no
        row in B (theirs would be zero), so they add nothing."""
        _check_fitted(self, "weights")
        out = np.zeros((len(user_idx), self.n_items), np.float32)
        out[:, self.active_items] = history_rows(histories, self.n_items)[:, self.active_items] @ self.weights
        return torch.from_numpy(out)

    @classmethod
    def tune(cls, split: Split, grid: Grid | None = None, **fixed: Any) -> tuple[dict, float]:
        """Grid over `grid` (default EASE_GRID, the lam values); `fixed` are other constructor arguments (dtype)."""
        params, ndcg, _ = grid_search(lambda **p: cls(**fixed, **p), split, grid or EASE_GRID)
        return params, ndcg


def upper_gram(rows: sp.csr_matrix, dtype: type, chunk_rows: int = 4096) -> np.ndarray:
    """XᵀX (A, A), Fortran-ordered, upper triangle only (all `ease_weights` reads; the lower is zero), accumulated
    over dense chunks of users by BLAS syrk into the matrix itself: memory is the matrix and a chunk (twice: scipy's
    wrapper copies it).
    (`gram += chunk.T @ chunk` built a second A x A matrix for every chunk.) For a 0/1 matrix every entry is a
    co-occurrence count, exact in float32 below 2^24, so the result does not depend on the summation order."""
    n = rows.shape[1]
    gram = np.zeros((n, n), dtype, order="F")
    syrk = scipy.linalg.get_blas_funcs("syrk", (gram,))
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = rows[start:start + chunk_rows].toarray().astype(dtype, copy=False)    # (users, n), C order
        # chunk.T is (n, users) in Fortran order, BLAS's own, so no copy: gram += chunk.T (chunk.T)ᵀ = chunkᵀ chunk
        gram = syrk(1.0, chunk.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
    return gram


# --------------------------------------------------------------------------------------------------------------
# iALS


IALS_GRID = {"factors": [32, 64, 128], "regularization": [0.1, 1.0, 10.0], "alpha": [2.0, 10.0, 40.0]}


class IALS:
    """Implicit ALS (Hu, Koren & Volinsky, ICDM 2008) via `implicit`; confidence c_ui = 1 + alpha·x_ui.

    implicit 0.7 uses the matrix it is given as the confidence itself (its own `alpha` only multiplies it), so we
    pass 1 + alpha·x and leave implicit's alpha at 1 to get the paper's confidence.
    """

    def __init__(self, factors: int = 64, regularization: float = 0.1, alpha: float = 10.0, iterations: int = 15,
                 seed: int = 0, num_threads: int = 2):
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.seed = seed
        self.num_threads = num_threads
        self.item_factors: np.ndarray | None = None  # (I, F)
        self._model = None                           # the fitted implicit model, which re-solves users

    def fit(self, split: Split, stage_for_tuning: str | None = "val") -> "IALS":
        _check_val_only(stage_for_tuning)
        start = time.perf_counter()
        import threadpoolctl
        from implicit.cpu.als import AlternatingLeastSquares

        confidence = split.train_matrix(binary=True)
        confidence.data = 1.0 + self.alpha * confidence.data
        # implicit parallelizes over users itself; a threaded BLAS underneath oversubscribes the cores (and
        # implicit warns about it), so BLAS runs single-threaded for the duration of the fit.
        with threadpoolctl.threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(factors=self.factors, regularization=self.regularization, alpha=1.0,
                                            iterations=self.iterations, num_threads=self.num_threads,
                                            random_state=self.seed)
            model.fit(confidence, show_progress=False)
        self.item_factors = np.asarray(model.item_factors, np.float32)
        self._model = model
        self.fit_seconds = time.perf_counter() - start
        return self

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """user_idx (B,), input histories -> (B, I). Each user's vector is re-solved from the input row against
        the fitted item factors (implicit's `recalculate_user`, the same least squares as a fit's user step), so
        the validation item folded in at test counts like any other interaction."""
        _check_fitted(self, "item_factors")
        import threadpoolctl

        confidence = history_rows(histories, len(self.item_factors))
        confidence.data = 1.0 + self.alpha * confidence.data
        with threadpoolctl.threadpool_limits(1, "blas"):
            users = self._model.recalculate_user(np.arange(len(histories)), confidence)
        return torch.from_numpy(np.asarray(users, np.float32) @ self.item_factors.T)

    @classmethod
    def tune(cls, split: Split, grid: Grid | None = None, **fixed: Any) -> tuple[dict, float]:
        """Grid over `grid` (default IALS_GRID); `fixed` are other constructor arguments (iterations, seed...)."""
        params, ndcg, _ = grid_search(lambda **p: cls(**fixed, **p), split, grid or IALS_GRID)
        return params, ndcg


# --------------------------------------------------------------------------------------------------------------
# Text zero-shot and the EASE + text blend


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; an all-zero row stays zero instead of becoming NaN."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


class TextZeroShot:
    """No training: user = mean of the L2-normalized text embeddings of their training items; score = cosine.

    item_emb (I, H) comes from the caller (a frozen sentence encoder embeds each item's text once).
    Users with no training items get all-zero scores.
    """

    def __init__(self, item_emb: np.ndarray):
        self.item_emb = np.asarray(item_emb, np.float32)
        self.item_unit: np.ndarray | None = None  # (I, H)

    def fit(self, split: Split, stage_for_tuning: str | None = "val") -> "TextZeroShot":
        _check_val_only(stage_for_tuning)
        start = time.perf_counter()
        if self.item_emb.ndim != 2 or self.item_emb.shape[0] != split.n_items:
            raise ValueError(f"item_emb must have shape (n_items={split.n_items}, H), got {self.item_emb.shape}; "
                             f"embed every catalogue item, in item_idx order.")
        self.item_unit = _l2_normalize(self.item_emb)
        self.fit_seconds = time.perf_counter() - start
        return self

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """user_idx (B,), input histories -> (B, I) cosine similarities in [-1, 1]."""
        _check_fitted(self, "item_unit")
        # Row-normalized input rows (B, I) @ unit embeddings (I, H) = mean of each user's unit embeddings.
        x = history_rows(histories, len(self.item_unit))
        lengths = np.maximum(np.diff(x.indptr), 1).astype(np.float32)
        users = _l2_normalize(np.asarray(sp.diags(1.0 / lengths) @ x @ self.item_unit, np.float32))
        return torch.from_numpy(users @ self.item_unit.T)

    @classmethod
    def tune(cls, split: Split, grid: Grid | None = None, *, item_emb: np.ndarray) -> tuple[dict, float]:
        params, ndcg, _ = grid_search(lambda: cls(item_emb), split, grid or {})
        return params, ndcg


BLEND_GRID = {"beta": [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0]}


class EASETextBlend:
    """score = z(EASE) + beta · z(text zero-shot), z-scored per user across all items.

    z-scoring puts the two scales (EASE's unbounded regression outputs, cosines in [-1, 1]) on one footing, so
    beta means the same thing on every dataset. `ease` may be an already fitted EASE to share across betas.
    """

    def __init__(self, item_emb: np.ndarray, lam: float = 500.0, beta: float = 1.0, ease: EASE | None = None):
        self.lam = lam
        self.beta = beta
        self.ease = ease
        self.text = TextZeroShot(item_emb)

    def fit(self, split: Split, stage_for_tuning: str | None = "val") -> "EASETextBlend":
        _check_val_only(stage_for_tuning)
        if self.ease is None or self.ease.weights is None or self.ease.lam != self.lam:
            self.ease = EASE(lam=self.lam).fit(split)
        self.text.fit(split)
        # A shared, already fitted EASE still counts: the blend cannot score without it.
        self.fit_seconds = self.ease.fit_seconds + self.text.fit_seconds
        return self

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """user_idx (B,), input histories -> (B, I)."""
        _check_fitted(self.text, "item_unit")
        return (zscore_rows(self.ease.score(user_idx, histories))
                + self.beta * zscore_rows(self.text.score(user_idx, histories)))

    @classmethod
    def tune(cls, split: Split, grid: Grid | None = None, *, item_emb: np.ndarray, lam: float | None = None
             ) -> tuple[dict, float]:
        """Tune beta with EASE's lam fixed; lam=None takes it from EASE's own validation tuning first."""
        params, ndcg, _ = cls.search(split, grid, item_emb, lam)
        return params, ndcg

    @classmethod
    def search(cls, split: Split, grid: Grid | None, item_emb: np.ndarray, lam: float | None,
               ease_grid: Grid | None = None) -> tuple[dict, float, "EASETextBlend"]:
        """tune() that also returns the fitted best model; ease_grid is used only when lam is None."""
        if lam is None:
            lam = EASE.tune(split, ease_grid)[0]["lam"]
        ease = EASE(lam=lam).fit(split)  # fitted once, shared by every beta
        params, ndcg, model = grid_search(lambda **p: cls(item_emb, lam=lam, ease=ease, **p), split,
                                          grid or BLEND_GRID)
        return {"lam": lam, **params}, ndcg, model


class TextPriorBlend:
    """A fitted model + our zero-shot text prior (raysparse.text_prior), blended exactly as our model blends
    it: z(model) + w(n) · z(text match of the input's items, form 'mean' or 'max'), w(n) = weight · items /
    (items + n). Chosen on validation with the same grid as ours, so 'SASRec + text prior' answers whether our
    gain is only the prior."""

    def __init__(self, base: Any, item_emb: np.ndarray, weight: float = 0.0, items: float = 0.0,
                 max_items: int = 50, form: str = "mean"):
        self.base, self.weight, self.items, self.max_items, self.form = base, weight, items, max_items, form
        self.unit = F.normalize(torch.as_tensor(np.asarray(item_emb, np.float32)), dim=-1)
        self.fit_seconds = getattr(base, "fit_seconds", 0.0)

    def fit(self, split: Split) -> "TextPriorBlend":
        return self  # the base model is fitted already; the blend has nothing to fit

    def prior(self, histories_newest_first: Sequence[np.ndarray], form: str | None = None) -> torch.Tensor:
        return text_scores(self.unit, histories_newest_first, self.max_items, form or self.form)

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        scores = torch.as_tensor(self.base.score(user_idx, histories)).float()
        if not self.weight:
            return scores
        newest_first = [np.asarray(h)[::-1] for h in histories]
        return blend(scores, self.prior(newest_first), input_lengths(newest_first, self.max_items),
                     self.weight, self.items)

    @classmethod
    def search(cls, base: Any, split: Split, item_emb: np.ndarray, grid: Grid | None = None
               ) -> tuple[dict, float, "TextPriorBlend"]:
        """grid None: choose (weight, items, form) on validation like ours (one scoring pass); a one-point grid
        {"weight": [w], "items": [h], "form": [f]} (a later seed reusing the first seed's choice) is taken as
        given."""
        model = cls(base, item_emb)
        if grid:
            model.weight, model.items = grid["weight"][0], grid["items"][0]
            model.form = grid.get("form", ["mean"])[0]
            params = {"weight": model.weight, "items": model.items, "form": model.form}
            return params, validation_ndcg10(model, split), model
        point, table = choose_text_prior(base.score, model.prior, split, split.evaluated_users, model.max_items)
        model.weight, model.items, model.form = point
        return {"weight": model.weight, "items": model.items, "form": model.form}, table[point], model


# --------------------------------------------------------------------------------------------------------------
# SASRec


class _Block(nn.Module):
    """Pre-LN transformer block as in the SASRec paper (Sec. III-B): x + Dropout(f(LayerNorm(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        assert hidden_size % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.num_heads = num_heads
        self.dropout = dropout
        self.ln_attn = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.ln_ffn = nn.LayerNorm(hidden_size)
        # Point-wise feed-forward with inner size = hidden size, as in the paper.
        self.ffn = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_size, hidden_size))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, H), attn_mask (B, 1, L, L) bool (True = may attend) -> (B, L, H)."""
        b, length, hidden = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).split(hidden, dim=-1)
        q, k, v = (t.view(b, length, self.num_heads, hidden // self.num_heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, length, hidden)))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class SASRecNet(nn.Module):
    """Self-attentive sequential recommender (Kang & McAuley, ICDM 2018, https://arxiv.org/abs/1808.09781).

    Input ids are item_idx + 1, with 0 = padding; sequences are left-padded so the newest item always sits at
    position L-1. The output layer shares the input item embedding, as in the paper.
    """

    def __init__(self, n_items: int, hidden_size: int, num_layers: int, num_heads: int, dropout: float,
                 max_len: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.item_emb = nn.Embedding(n_items + 1, hidden_size, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden_size)
        nn.init.normal_(self.item_emb.weight, std=hidden_size ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=hidden_size ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden_size, num_heads, dropout) for _ in range(num_layers))
        self.ln_out = nn.LayerNorm(hidden_size)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) int64 ids (0 = padding) -> hidden states (B, L, H); position t has seen items <= t only."""
        length = seq.shape[1]
        # Positions count back from the newest item (always at max_len - 1), so a batch cut to its longest
        # sequence (`SASRec._fit`) gives every item the position it has in a full max_len row.
        max_len = self.pos_emb.num_embeddings
        if length > max_len:
            raise ValueError(f"SASRecNet got sequences of {length} items but has positions for max_len={max_len}: "
                             f"keep each sequence's newest {max_len} items (seq[:, -{max_len}:]) or build the "
                             f"network with a larger max_len.")
        x = self.item_emb(seq) * math.sqrt(self.hidden_size) + self.pos_emb(torch.arange(max_len - length, max_len))
        x = self.drop(x)
        valid = seq > 0                                                       # (B, L)
        causal = torch.ones(length, length, dtype=torch.bool).tril()          # query t sees keys <= t
        # A padding query would see no key at all (softmax of nothing = NaN), so it may see itself; its output
        # is zeroed below and never used as a prediction.
        mask = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool)
        mask = mask[:, None]                                                  # (B, 1, L, L), heads broadcast
        for block in self.blocks:
            x = block(x, mask) * valid[..., None]
        return self.ln_out(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> (..., I): dot product with every item's embedding (padding row dropped)."""
        return hidden @ self.item_emb.weight[1:].T


SASREC_GRID = {"hidden_size": [64], "num_layers": [1, 2], "dropout": [0.2, 0.5]}


class SASRec:
    """SASRec trained with full-softmax cross-entropy on every prefix -> next item of each training sequence.

    Full softmax instead of the paper's one-negative BCE: it is what makes SASRec strong in full ranking
    (Klenitskiy & Vasilev, RecSys 2023, https://arxiv.org/abs/2309.07602). Early stopping on validation NDCG@10
    (evaluated every epoch, full ranking), keeping the best epoch's weights. lr 3e-3 rather than the paper's
    1e-3: on ML-latest-small (64 hidden, 2 layers) it peaked at validation NDCG@10 0.056 at epoch 14, while 1e-3
    was at 0.054 after 37 epochs; epochs are what 2 CPU cores cannot afford.

    Patience 10 epochs (RecBole's default stopping_step), not 3: on ML latest-small, seed 1 (dropout 0.5) starts
    slowly, and with patience 3 it stopped at epoch 8 with validation NDCG@10 0.021 while its loss was still
    falling; given 10 it reached 0.059 by epoch 24, the level of seeds 0 and 2 (docs/ACCURACY.md).
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 1, dropout: float = 0.2,
                 max_len: int = 50, epochs: int = 200, batch_size: int = 128, lr: float = 3e-3,
                 weight_decay: float = 0.0, patience: int = 10, seed: int = 0, num_threads: int = 2):
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.dropout = dropout
        self.max_len = max_len
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.patience = patience
        self.seed = seed
        self.num_threads = num_threads
        self.net: SASRecNet | None = None
        self.history: list[dict] = []  # per epoch: loss, val ndcg@10, seconds

    def fit(self, split: Split, stage_for_tuning: str | None = "val") -> "SASRec":
        _check_val_only(stage_for_tuning)
        with torch_threads(self.num_threads):
            return self._fit(split, stage_for_tuning)

    def _fit(self, split: Split, stage_for_tuning: str | None) -> "SASRec":
        start = time.perf_counter()
        torch.manual_seed(self.seed)
        self.net = SASRecNet(split.n_items, self.hidden_size, self.num_layers, self.num_heads, self.dropout,
                             self.max_len)
        inputs, targets = training_windows(split, self.max_len)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        order_rng = torch.Generator().manual_seed(self.seed)
        best_ndcg, best_state, since_best = -1.0, None, 0
        self.history = []
        for epoch in range(self.epochs):
            epoch_start = time.perf_counter()
            self.net.train()
            total, count = 0.0, 0
            for batch in torch.randperm(len(inputs), generator=order_rng).split(self.batch_size):
                seq, tgt = inputs[batch], targets[batch]
                # Only as wide as the batch's longest window: left of it every row is padding, which attention
                # masks out and no target sits in (exact; on Amazon Scientific most of a 50-wide row is padding).
                width = max(int((seq > 0).sum(1).max()), 1)
                seq, tgt = seq[:, -width:], tgt[:, -width:]
                hidden = self.net(seq)                       # (B, L, H)
                real = tgt > 0                               # positions with a next item to predict
                logits = self.net.logits(hidden[real])       # (N, I): full softmax over the catalogue
                loss = F.cross_entropy(logits, tgt[real] - 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * int(real.sum()), count + int(real.sum())
            record = {"epoch": epoch, "loss": total / max(count, 1)}
            if stage_for_tuning == "val":
                record["val_ndcg@10"] = ndcg = validation_ndcg10(self, split)
                if ndcg > best_ndcg:
                    best_ndcg, best_state, since_best = ndcg, copy.deepcopy(self.net.state_dict()), 0
                else:
                    since_best += 1
            record["seconds"] = time.perf_counter() - epoch_start
            self.history.append(record)
            log.info("SASRec epoch %s", record)
            if stage_for_tuning == "val" and since_best >= self.patience:
                break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()
        self.fit_seconds = time.perf_counter() - start
        return self

    def score(self, user_idx: np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """user_idx (B,), input histories -> (B, I): logits of the last position given each input's newest
        `max_len` items."""
        _check_fitted(self, "net")
        seq = torch.from_numpy(recent_items(histories, self.max_len))
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad(), torch_threads(self.num_threads):
            out = self.net.logits(self.net(seq)[:, -1])
        self.net.train(was_training)
        return out

    @classmethod
    def tune(cls, split: Split, grid: Grid | None = None, **fixed: Any) -> tuple[dict, float]:
        """Grid over `grid` (default SASREC_GRID); `fixed` are other constructor arguments (epochs, lr, seed...)."""
        params, ndcg, _ = grid_search(lambda **p: cls(**fixed, **p), split, grid or SASREC_GRID)
        return params, ndcg


def recent_items(histories: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """(B, max_len) int64 ids (item_idx + 1), each history's newest items right-aligned, 0-padded left."""
    out = np.zeros((len(histories), max_len), np.int64)
    for row, history in enumerate(histories):
        items = np.asarray(history, np.int64)[-max_len:]
        if len(items):
            out[row, max_len - len(items):] = items + 1
    return out


def training_windows(split: Split, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each training sequence into windows so every transition prefix -> next item is a target exactly once.

    A window is up to max_len + 1 consecutive items w; input = w[:-1], target = w[1:] (both right-aligned,
    0 = padding). Windows are taken from the newest end backwards and overlap by one item, so the first item of
    a window is the last input of the one before it. Returns inputs, targets: (W, max_len) int64 ids (item + 1).
    """
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for u in range(split.n_users):
        seq = split.history(u) + 1
        end = len(seq)
        while end > 1:
            start = max(0, end - (max_len + 1))
            window = seq[start:end]
            inp, tgt = np.zeros(max_len, np.int64), np.zeros(max_len, np.int64)
            inp[max_len - len(window) + 1:] = window[:-1]
            tgt[max_len - len(window) + 1:] = window[1:]
            inputs.append(inp)
            targets.append(tgt)
            end = start + 1
    if not inputs:
        raise ValueError("SASRec needs at least one user with 2 or more training items; this split has none.")
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))


# --------------------------------------------------------------------------------------------------------------
# Driver


BASELINES = ("popularity", "ease", "ials", "text", "ease_text", "sasrec", "sasrec_text")

_FAST_GRIDS: dict[str, Grid] = {
    "ease": {"lam": [10.0, 100.0]},
    "ials": {"factors": [16], "regularization": [0.1], "alpha": [10.0]},
    "ease_text": {"beta": [0.0, 1.0]},
    "sasrec": {"hidden_size": [32], "num_layers": [1], "dropout": [0.2]},
}


def run_baselines(split: Split, item_emb: np.ndarray | None, names: list[str], seed: int, fast: bool = False,
                  num_threads: int = 2, grids: dict[str, Grid] | None = None) -> dict[str, dict]:
    """Tune each named baseline on validation, then report the chosen one on val and test (sampled=True too).

    names: any of BASELINES; "text" and "ease_text" need item_emb (I, H). fast=True shrinks grids and epochs
    (for tests); num_threads goes to iALS and SASRec (1 is faster on a loaded machine). "ease_text" reuses the
    lam chosen by "ease" when that runs first. Returns {name: {"params", "val", "test", "tune_val_ndcg@10",
    "fit_seconds", "tune_seconds"}}: val/test are `evaluate` results (full ranking and sampled100/...),
    fit_seconds the chosen configuration's own fit, tune_seconds the whole grid search, test_ranks the full-ranking
    rank of each evaluated user's test item (split.evaluated_users order)."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline names {unknown}; choose from {list(BASELINES)}.")
    if item_emb is None and {"text", "ease_text", "sasrec_text"} & set(names):
        raise ValueError("baselines 'text', 'ease_text' and 'sasrec_text' need item_emb (n_items, H); pass the "
                         "item text embeddings or drop those names.")
    if "sasrec_text" in names and ("sasrec" not in names or names.index("sasrec") > names.index("sasrec_text")):
        raise ValueError("baseline 'sasrec_text' blends the fitted SASRec: list 'sasrec' before it.")
    # `grids` overrides per name, e.g. one-point grids holding an earlier seed's choice (no re-tuning).
    grids = {name: (grids or {}).get(name, _FAST_GRIDS.get(name) if fast else None) for name in names}
    results: dict[str, dict] = {}
    models: dict[str, Any] = {}
    for name in names:
        start = time.perf_counter()
        params, tune_ndcg, model = _search_one(name, split, item_emb, grids[name], seed, fast, num_threads,
                                               results, models)
        models[name] = model
        tune_seconds = time.perf_counter() - start
        fit_seconds = model.fit_seconds
        test, test_ranks = evaluate_ranks(model.score, split, "test", sampled=True, seed=seed)
        results[name] = {
            "params": params,
            "val": evaluate(model.score, split, "val", sampled=True, seed=seed),
            "test": test,
            "tune_val_ndcg@10": tune_ndcg,
            "fit_seconds": fit_seconds,
            "tune_seconds": tune_seconds,
            # per evaluated user (split.evaluated_users order): for paired comparisons between models
            "test_ranks": test_ranks,
        }
        log.info("%s: params %s, val ndcg@10 %.4f, test ndcg@10 %.4f, fit %.1fs, tune %.1fs", name, params,
                 results[name]["val"]["overall"]["ndcg@10"], results[name]["test"]["overall"]["ndcg@10"],
                 fit_seconds, tune_seconds)
    return results


def _search_one(name: str, split: Split, item_emb: np.ndarray | None, grid: Grid | None, seed: int, fast: bool,
                num_threads: int, done: dict[str, dict], models: dict[str, Any]) -> tuple[dict, float, Baseline]:
    if name == "popularity":
        return grid_search(Popularity, split, {})  # nothing to tune
    if name == "ease":
        return grid_search(EASE, split, grid or EASE_GRID)
    if name == "ials":
        return grid_search(lambda **p: IALS(seed=seed, num_threads=num_threads, **p), split, grid or IALS_GRID)
    if name == "text":
        return grid_search(lambda: TextZeroShot(item_emb), split, {})
    if name == "ease_text":
        lam = done["ease"]["params"]["lam"] if "ease" in done else None  # reuse EASE's own tuning
        return EASETextBlend.search(split, grid, item_emb, lam, ease_grid=_FAST_GRIDS["ease"] if fast else None)
    if name == "sasrec":
        return grid_search(lambda **p: SASRec(seed=seed, epochs=5 if fast else 200,
                                                     num_threads=num_threads, **p), split,
                           grid or SASREC_GRID)
    if name == "sasrec_text":
        return TextPriorBlend.search(models["sasrec"], split, item_emb, grid)
    raise AssertionError(name)
