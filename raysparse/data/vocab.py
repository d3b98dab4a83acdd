"""Vocabulary: raw external ids (`*_id`, str or int) <-> dense indices (`*_idx`, 0..n-1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from raysparse.errors import UnknownIdError


class Vocab:
    """Raw ids in index order. Integer ids stay integers and string ids stay strings (also in JSON)."""

    def __init__(self, raw_ids: Sequence, kind: str = "item"):
        self.kind = kind
        self.raw_ids = list(raw_ids)
        self._index = pd.Index(self.raw_ids)
        self._positions: dict | None = None
        if not self._index.is_unique:
            dup = self._index[self._index.duplicated()][:5].tolist()
            raise ValueError(f"{kind} vocabulary has duplicate ids, e.g. {dup}")

    @classmethod
    def from_values(cls, values: Iterable, kind: str = "item") -> "Vocab":
        """Unique values in first-appearance order (stable across runs for the same file)."""
        return cls(pd.unique(pd.Series(list(values) if not isinstance(values, (pd.Series, np.ndarray)) else values)).tolist(), kind)

    def __len__(self) -> int:
        return len(self.raw_ids)

    def __contains__(self, raw_id: object) -> bool:
        return self.lookup([raw_id])[0] >= 0

    def lookup(self, raw_ids: Sequence) -> np.ndarray:
        """Dense indices, -1 for unknown ids. Accepts "42" for an integer vocabulary (JSON clients send strings)."""
        if isinstance(raw_ids, (list, tuple)) and len(raw_ids) <= 64:
            # Serving looks up a handful of ids per request: a dict beats building a pandas Index.
            if self._positions is None:
                self._positions = {raw: i for i, raw in enumerate(self.raw_ids)}
            idx = np.array([self._positions.get(r, -1) if _hashable(r) else -1 for r in raw_ids], np.int64)
            values = pd.Index(list(raw_ids), dtype=object)
        else:
            values = pd.Index(list(raw_ids) if not isinstance(raw_ids, (pd.Series, np.ndarray, pd.Index)) else raw_ids)
            idx = self._index.get_indexer(values)
        if (idx < 0).any() and self._index.dtype.kind in "iu":
            # Retry the misses as integers: "42" and 42.0 name the same item.
            for pos in np.flatnonzero(idx < 0):
                try:
                    as_int = int(str(values[pos]))
                except ValueError:
                    continue
                idx[pos] = self._index.get_indexer([as_int])[0]
        return idx.astype(np.int64)

    def to_idx(self, raw_ids: Sequence) -> np.ndarray:
        """Dense indices; raises UnknownIdError listing every unknown id."""
        idx = self.lookup(raw_ids)
        if (idx < 0).any():
            unknown = [raw_ids[i] for i in np.flatnonzero(idx < 0)]
            raise UnknownIdError(f"unknown {self.kind} id(s): {unknown[:20]!r}"
                                 + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
                                 + f"; they are not in the training data's {len(self)} {self.kind}s.", unknown)
        return idx

    def to_raw(self, idx: Iterable[int]) -> list:
        return [self.raw_ids[int(i)] for i in idx]

    def to_json(self) -> dict:
        ids = [int(x) if isinstance(x, (np.integer,)) else x for x in self.raw_ids]
        return {"kind": self.kind, "ids": ids}

    @classmethod
    def from_json(cls, data: dict) -> "Vocab":
        return cls(data["ids"], data.get("kind", "item"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        return cls.from_json(json.loads(Path(path).read_text()))


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
