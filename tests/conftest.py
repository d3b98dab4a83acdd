"""Shared fixtures: a small planted dataset and a tiny BERT built from a config (no network)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

TOPIC_WORDS = [["galaxy", "rocket", "alien", "orbit"], ["castle", "dragon", "sword", "wizard"],
               ["detective", "murder", "clue", "alibi"], ["love", "wedding", "kiss", "romance"]]


def planted_frames(n_users: int = 120, n_items: int = 40, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items belong to 4 topics whose words are in their titles; each user watches items of one topic in a
    fixed cyclic order, so both the text and the sequence predict the next item."""
    rng = np.random.default_rng(seed)
    topic_of = np.arange(n_items) % 4
    items = pd.DataFrame({
        "item_id": [f"i{i:03d}" for i in range(n_items)],
        "title": [" ".join(rng.choice(TOPIC_WORDS[t], 2)) + f" {i}" for i, t in enumerate(topic_of)],
        "genres": [f"genre{t}" for t in topic_of],
    })
    rows = []
    for u in range(n_users):
        topic = u % 4
        pool = np.flatnonzero(topic_of == topic)
        length = int(rng.integers(4, 9))
        start = int(rng.integers(0, len(pool)))
        for t in range(length):
            rows.append((f"u{u:03d}", f"i{pool[(start + t) % len(pool)]:03d}", 1000 + 10 * t + u))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), items


@pytest.fixture(scope="session")
def frames():
    return planted_frames()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, frames):
    from raysparse.data.text import render_item_texts
    from raysparse.model.text import build_tiny_encoder

    texts = render_item_texts(frames[1], "{title}. {genres}")
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"), texts + ["space opera"])
