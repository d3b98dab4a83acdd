"""Recommender: the one scoring path used by offline evaluation, the Python API and the server.

    rec = Recommender.load("runs/demo/artifact")
    rec.recommend(user_ids=["u00042"], k=10)                # known users
    rec.recommend(histories=[["i00007", "i00311"]], k=10)   # users unseen in training (fold-in), oldest first
    rec.recommend(texts=["space opera with robots"], k=10)  # users described only by text

Item vectors are computed once (at load, or by `refresh()` after training changes the weights). A server also
calls `cache_known_users()`: every known user's vector is computed once, so a warm request is one matrix product
and a top-k.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from raysparse.artifact import load_artifact, save_artifact
from raysparse.config import Config
from raysparse.data.examples import BatchBuilder, all_item_bags
from raysparse.data.vocab import Vocab
from raysparse.errors import UserError
from raysparse.model.hybrid import HybridRecommender
from raysparse.serve_config import TEXT_ENCODER_DTYPES
from raysparse.text_prior import blend, input_lengths, text_scores, user_text_vectors, zscore_rows

MAX_K = 1000   # the most items one answer may hold (the Python API and the HTTP API alike)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it and a
    bfloat16 encoder would be slower than float32. Reads /proc/cpuinfo (Linux); False where it cannot."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def no_text_tower_message(variant: str) -> str:
    """What a text query to a model without text is told (the Python API and the HTTP API alike)."""
    return (f"this model has no text tower (model.variant={variant!r}); send a user_id or a history "
            f"instead of text.")


@dataclass(frozen=True)
class KnownUsers:
    """What a warm request needs of each known user, computed once (`Recommender.cache_known_users`)."""

    vectors: torch.Tensor          # (U, D) user vectors from each training history
    texts: torch.Tensor | None     # (U, H) unit mean item text of each history (the 'mean' text prior's user side)
    lengths: list                  # (U,) n in the prior's weight w(n): history length capped at max_history


@dataclass
class Recommendation:
    item_id: object
    score: float


class Recommender:
    def __init__(self, model: HybridRecommender, config: Config, users: Vocab, items: Vocab,
                 builder: BatchBuilder, tokenizer=None, item_table: pd.DataFrame | None = None):
        self.model = model
        self.config = config
        self.users, self.items = users, items
        self.builder = builder
        self.tokenizer = tokenizer
        self.item_table = item_table
        self.item_vectors: torch.Tensor | None = None
        self.user_cache: KnownUsers | None = None
        self.refresh()

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Recommender":
        return cls(**load_artifact(path))

    def save(self, path: str | Path, metrics: dict | None = None) -> Path:
        return save_artifact(self, path, metrics)

    @contextlib.contextmanager
    def inference(self):
        """Eval mode (no dropout) and no autograd, restoring the training flag: the same model object is
        scored between epochs of a training run."""
        was_training = self.model.training
        if was_training:  # .eval() walks every submodule: skip it on the serving hot path
            self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.model.train(True)

    def refresh(self) -> None:
        """Recompute every item vector (I, D) from the current weights."""
        with self.inference():
            vecs = [self.model.item_vectors(b["cand_items"], b["col_users"], b["col_offsets"], b["col_weights"])
                    for b in all_item_bags(self.builder)]
        self.item_vectors = torch.cat(vecs).float()
        self.refresh_item_text()
        if self.user_cache is not None:  # the cached user vectors came from the old weights
            self.cache_known_users()

    def cache_known_users(self) -> None:
        """Compute each known user's vector (and text-prior side) once, for warm `top_k` calls without new items.

        Each user is computed alone (a batch of one), as an uncached warm request computes it, so cached answers
        equal uncached ones to the bit (a larger batch would change float32 rounding). Costs one model pass per
        user at load (~0.1-0.3 ms each on a CPU core) and users x (D + H) x 4 bytes; `refresh()` recomputes it.
        """
        n_users = self.builder.split.n_users
        vectors, texts, lengths = [], [], []
        # The 'max' form's user side is the history itself (every item's cosines), read again per request.
        with_text = (bool(self.config.model.text_prior) and self.unit_item_text is not None
                     and self.config.model.text_prior_form == "mean")
        with self.inference():
            for u in range(n_users):
                seen = self._histories_newest_first([u], None)
                vectors.append(self.model.user_vectors(self.builder.user_inputs(seen)).float())
                if with_text:
                    texts.append(user_text_vectors(self.unit_item_text, seen, self.config.data.max_history))
                lengths.append(input_lengths(seen, self.config.data.max_history)[0])
        empty = torch.zeros(0, self.item_vectors.shape[1])
        self.user_cache = KnownUsers(torch.cat(vectors) if vectors else empty,
                                     torch.cat(texts) if texts else None, lengths)

    def set_text_encoder_dtype(self, choice: str = "auto") -> torch.dtype | None:
        """Run the text encoder's weights in float32 or bfloat16 from now on (a served model; see
        ServeConfig.text_encoder_dtype); returns the dtype used, None without a text tower.

        'auto' picks bfloat16 only where it is safe and faster: a frozen encoder (its only work at serve time is
        the free-text query; item vectors and cached users were computed in float32 at load) on a CPU that
        computes bfloat16 natively. On this 2-core box that cut MiniLM's pass for a two-title text from 9.4 to
        7.6 ms, pooled embeddings at cosine >= 0.9999 to float32 (docs/BENCHMARKS.md). Call it after load and
        `cache_known_users`: what was computed before keeps float32.
        """
        if choice not in TEXT_ENCODER_DTYPES:
            raise UserError(f"text encoder dtype {choice!r} is not one of {', '.join(TEXT_ENCODER_DTYPES)}.")
        text = self.model.text
        if text is None:
            return None
        if choice == "auto":
            on_cpu = next(text.encoder.parameters()).device.type == "cpu"
            choice = ("bfloat16" if text.finetune == "frozen" and on_cpu and cpu_has_native_bf16()
                      else "float32")
        dtype = getattr(torch, choice)
        text.encoder.to(dtype)
        return dtype

    def refresh_item_text(self) -> None:
        """The text prior's item side: the frozen item text embeddings at unit length (None without text)."""
        text = self.model.text
        self.unit_item_text = (torch.nn.functional.normalize(text.item_text_emb.detach().float(), dim=-1)
                               if text is not None else None)

    def with_text_prior(self, scores: torch.Tensor, histories_newest_first: Sequence[np.ndarray]) -> torch.Tensor:
        """`scores` blended with the zero-shot text prior of each input (model.text_prior; unchanged when 0)."""
        mc = self.config.model
        if not mc.text_prior or self.unit_item_text is None:
            return scores
        return blend(scores, self.text_prior_scores(histories_newest_first),
                     input_lengths(histories_newest_first, self.config.data.max_history), mc.text_prior,
                     mc.text_prior_items)

    def text_prior_scores(self, histories_newest_first: Sequence[np.ndarray], form: str | None = None) -> torch.Tensor:
        """(B, I) the standardised text prior alone (what `choose_text_prior` weighs); form None:
        model.text_prior_form."""
        return text_scores(self.unit_item_text, histories_newest_first, self.config.data.max_history,
                           form or self.config.model.text_prior_form)

    # ---- scoring (index space) ----------------------------------------------------------------------------
    def score_inputs(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.inference():
            users = self.model.user_vectors(inputs).float()
            return self.model.score(users, self.item_vectors)

    def score_users(self, user_idx: np.ndarray, histories: Sequence[np.ndarray] | None = None,
                    text_prior: bool = True) -> torch.Tensor:
        """(B, I) scores for known users (the evaluation entry point, a `raysparse.metrics.ScoreFn`).

        histories: each user's input, oldest first, as the protocol gives it (`Split.model_input`: the training
        history, + the validation item at test); None reads the training histories. Items beyond the training
        history are new interactions (weight 1), read through the same path as a served fold-in.
        text_prior=False: the model's scores alone, without model.text_prior.
        """
        items, weights = self.builder.user_histories([int(u) for u in user_idx])
        if histories is not None:
            for row, (u, given) in enumerate(zip(user_idx, histories)):
                known = self.builder.split.history(int(u))
                if len(given) < len(known) or not np.array_equal(given[:len(known)], known):
                    raise ValueError(f"user {int(u)}: the given history does not start with the training "
                                     f"history; pass the protocol's input (Split.model_input).")
                extra = np.asarray(given[len(known):], np.int64)[::-1]      # newest first
                items[row] = np.concatenate([extra, items[row]])
                weights[row] = np.concatenate([np.ones(len(extra), np.float32), weights[row]])
        scores = self.score_inputs(self.builder.user_inputs(items, weights))
        return self.with_text_prior(scores, items) if text_prior else scores

    def score_histories(self, histories_newest_first: Sequence[np.ndarray]) -> torch.Tensor:
        scores = self.score_inputs(self.builder.user_inputs(list(histories_newest_first)))
        return self.with_text_prior(scores, histories_newest_first)

    def encode_query_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, H) encoder embeddings of free texts, each cut to data.max_length tokens. (The HTTP layer counts a
        text's tokens once, to tell the client when it was cut; this path tokenizes once more, to encode.)"""
        if self.model.text is None:
            raise UserError(no_text_tower_message(self.config.model.variant))
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.data.max_length,
                             return_tensors="pt")
        with self.inference():
            return self.model.text.encode(enc["input_ids"], enc["attention_mask"])

    def score_texts(self, texts: Sequence[str]) -> torch.Tensor:
        emb = self.encode_query_texts(texts)
        inputs = self.builder.user_inputs([np.zeros(0, np.int64) for _ in texts])
        inputs.pop("input_ids", None)
        inputs.pop("attention_mask", None)
        inputs["query_emb"] = emb
        return self.score_inputs(inputs)

    # ---- public API (raw ids) ------------------------------------------------------------------------------
    def recommend(self, user_ids: Sequence | None = None, histories: Sequence[Sequence] | None = None,
                  texts: Sequence[str] | None = None, k: int = 10, exclude_seen: bool = True,
                  exclude: Sequence | None = None) -> list[list[Recommendation]]:
        """Top-k raw item ids with scores, one list per user.

        user_ids: known users. histories: raw item ids per user, oldest first (with user_ids: new interactions
        appended to the known history). texts: free-text descriptions of users with no history.
        Seen items (training history + given history) are excluded unless exclude_seen=False; `exclude`
        lists extra raw item ids to leave out for every user.
        """
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(MAX_K, len(self.items)):
            raise UserError(f"k={k!r} must be an integer in [1, {min(MAX_K, len(self.items))}].")
        given = [x is not None for x in (user_ids, histories, texts)]
        if texts is not None and any(given[:2]):
            raise UserError("send texts alone, or user_ids and/or histories; not texts with them.")
        if not any(given):
            raise UserError("nothing to recommend for: pass user_ids, histories or texts.")
        if texts is not None and any(not isinstance(t, str) or not t.strip() for t in texts):
            raise UserError("every text must be a non-empty string describing the user's interests.")
        user_idx = self.users.to_idx(list(user_ids)) if user_ids is not None else None
        history_idx = self._history_idx(histories, user_ids) if histories is not None else None
        exclude_idx = self.items.to_idx(list(exclude)) if exclude else None
        rows = self.top_k(user_idx, history_idx, texts, k, exclude_seen, exclude_idx)
        return [[Recommendation(self.items.raw_ids[i], score) for i, score in row] for row in rows]

    def _history_idx(self, histories: Sequence[Sequence], user_ids: Sequence | None) -> list[np.ndarray]:
        """Raw item ids per user, oldest first -> item_idx arrays, oldest first."""
        if user_ids is not None and len(histories) != len(user_ids):
            raise UserError(f"got {len(user_ids)} user_ids but {len(histories)} histories; send one each.")
        out = []
        for h in histories:
            if isinstance(h, (str, bytes)) or not hasattr(h, "__len__"):
                raise UserError("each history must be a list of item ids, oldest first.")
            if len(h) == 0 and user_ids is None:
                raise UserError("a history is empty: send at least one item id, or a text instead.")
            out.append(self.items.to_idx(list(h)) if len(h) else np.zeros(0, np.int64))
        return out

    # ---- top-k (index space: the server converts raw ids once, when it checks a request) --------------------
    def top_k(self, user_idx: Sequence[int] | None = None, histories: Sequence[Sequence[int]] | None = None,
              texts: Sequence[str] | None = None, k: int = 10, exclude_seen: bool = True,
              exclude: Sequence[int] | None = None) -> list[list[tuple[int, float]]]:
        """`recommend` in index space: (item_idx, score) pairs, best first, one list per user.

        user_idx: known users. histories: item_idx per user, oldest first. texts: free texts (alone).
        exclude: item_idx to leave out for every user. The arguments are checked by the caller (`recommend`,
        or the HTTP API's `plan_query`): k in [1, min(MAX_K, items)], non-empty texts and fold-in histories.
        """
        seen: list[np.ndarray]
        if texts is not None:
            scores = self.score_texts(texts)
            seen = [np.zeros(0, np.int64) for _ in texts]
        elif histories is None and user_idx is not None and self._cached(user_idx):
            seen = self._histories_newest_first(user_idx, None)
            scores = self._cached_scores(user_idx)
        else:
            seen = self._histories_newest_first(user_idx, histories)
            scores = self.score_histories(seen)
        excluded = np.asarray(exclude, np.int64) if exclude is not None else np.zeros(0, np.int64)
        results = []
        for row in range(scores.shape[0]):
            s = scores[row].clone()
            if exclude_seen and len(seen[row]):
                s[torch.as_tensor(seen[row])] = float("-inf")
            if len(excluded):
                s[torch.as_tensor(excluded)] = float("-inf")
            top = torch.topk(s, k)
            # Plain Python values first: a per-element tensor op (torch.isfinite(v)) cost more than the scoring.
            results.append([(i, v) for v, i in zip(top.values.tolist(), top.indices.tolist()) if math.isfinite(v)])
        return results

    def _cached(self, user_idx: Sequence[int]) -> bool:
        """Whether `user_cache` answers these known users as the model would now (a text prior switched on after
        caching has no cached side: those calls take the uncached path)."""
        cache = self.user_cache
        mc = self.config.model
        return (cache is not None and len(cache.lengths) == self.builder.split.n_users
                and (cache.texts is not None or mc.text_prior_form == "max"
                     or not (mc.text_prior and self.unit_item_text is not None)))

    def _cached_scores(self, user_idx: Sequence[int]) -> torch.Tensor:
        """(B, I) `score_histories` of known users' training histories, from `user_cache`."""
        cache = self.user_cache
        rows = torch.as_tensor(np.asarray(user_idx, np.int64))
        with torch.no_grad():
            scores = self.model.score(cache.vectors[rows], self.item_vectors)
            mc = self.config.model
            if not mc.text_prior or self.unit_item_text is None:
                return scores
            if mc.text_prior_form == "mean":
                prior = zscore_rows(cache.texts[rows] @ self.unit_item_text.T)
            else:
                prior = self.text_prior_scores(self._histories_newest_first(list(user_idx), None))
            return blend(scores, prior, [cache.lengths[int(u)] for u in user_idx], mc.text_prior, mc.text_prior_items)

    def _histories_newest_first(self, user_idx: Sequence[int] | None,
                                histories: Sequence[Sequence[int]] | None) -> list[np.ndarray]:
        known: list[np.ndarray] | None = None
        if user_idx is not None:
            # Serving reads the full training history (newest first) for exclusions; the model input is
            # capped at max_history inside user_inputs.
            known = [self.builder.split.history(int(u))[::-1].copy() for u in user_idx]
        new: list[np.ndarray] | None = None
        if histories is not None:
            new = [np.asarray(h, np.int64)[::-1].copy() for h in histories]
        if known is None:
            return new  # type: ignore[return-value]
        if new is None:
            return known
        return [np.concatenate([n, k]) for n, k in zip(new, known)]

    def item_info(self, item_id) -> dict:
        return self.item_row(int(self.items.to_idx([item_id])[0]))

    def item_row(self, item_idx: int) -> dict:
        """The catalogue row of one item (plain Python values; {} without a catalogue)."""
        row = {} if self.item_table is None else self.item_table.iloc[item_idx].to_dict()
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
