"""Index a validated interaction log: raw ids -> dense indices, with weights and time order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from raysparse.data.vocab import Vocab
from raysparse.errors import DataError


@dataclass
class IndexedLog:
    """Interactions as dense arrays, in file order. Length E = number of interactions."""

    user_idx: np.ndarray        # (E,) int64
    item_idx: np.ndarray        # (E,) int64
    timestamp: np.ndarray       # (E,) int64; file position when the log has no timestamps
    rating: np.ndarray | None   # (E,) float32 or None for implicit logs
    users: Vocab
    items: Vocab

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.user_idx)


def index_interactions(interactions: pd.DataFrame, items: pd.DataFrame) -> IndexedLog:
    """Map raw ids to indices. Items follow catalogue order (every catalogue item is rankable, even unseen
    ones); users follow first appearance. Interactions must already be validated against the catalogue."""
    item_vocab = Vocab(items["item_id"].tolist(), kind="item")
    item_idx = _catalogue_index(interactions["item_id"], items["item_id"])
    if (item_idx < 0).any():
        missing = interactions["item_id"].to_numpy()[item_idx < 0]
        raise DataError(f"{len(missing)} interactions name items missing from the catalogue, e.g. "
                        f"{pd.unique(missing)[:5].tolist()}; validate with read_interactions(catalogue=...) "
                        f"or run `raysparse data check`.")
    user_codes, user_uniques = pd.factorize(interactions["user_id"], sort=False)
    users = Vocab(user_uniques.tolist(), kind="user")
    n = len(interactions)
    if "timestamp" in interactions.columns:
        timestamp = interactions["timestamp"].to_numpy(dtype=np.int64)
    else:
        timestamp = np.arange(n, dtype=np.int64)  # no clock: file order is the order
    rating = interactions["rating"].to_numpy(dtype=np.float32) if "rating" in interactions.columns else None
    return IndexedLog(user_idx=user_codes.astype(np.int64), item_idx=item_idx, timestamp=timestamp,
                      rating=rating, users=users, items=item_vocab)


def _catalogue_index(item_ids: pd.Series, catalogue_ids: pd.Series) -> np.ndarray:
    """Position of each interaction's item in the catalogue (-1 if absent). pyarrow's hash lookup avoids
    turning millions of string ids into Python objects."""
    if item_ids.dtype.kind in "iu" and catalogue_ids.dtype.kind in "iu":
        return pd.Index(catalogue_ids).get_indexer(item_ids).astype(np.int64)
    values = pa.array(item_ids.astype(str)) if item_ids.dtype.kind in "iu" else pa.array(item_ids)
    value_set = pa.array(catalogue_ids.astype(str)) if catalogue_ids.dtype.kind in "iu" else pa.array(catalogue_ids)
    if values.type != value_set.type:
        values, value_set = values.cast(pa.string()), value_set.cast(pa.string())
    found = pc.index_in(values, value_set=value_set)
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
