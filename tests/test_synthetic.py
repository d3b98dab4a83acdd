"""Synthetic generator: the planted structure is really there (topics, long tails, drift, text)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from raysparse.cli import main
from raysparse.data.io import load_dataset
from raysparse.data.synthetic import FILLER_WORDS, generate_synthetic, make_synthetic, topic_vocabulary
from raysparse.errors import ConfigError


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_users=3000, n_items=2000, seed=7)


def shares_topic(data, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    ut, it = data.user_topics[user], data.item_topics[item]
    return ((it[:, [0]] == ut) | ((it[:, [1]] == ut) & (it[:, [1]] >= 0))).any(axis=1) & (ut >= 0).any(axis=1)


def test_same_seed_same_data_other_seed_other_data():
    a, b = make_synthetic(200, 100, seed=3), make_synthetic(200, 100, seed=3)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not make_synthetic(200, 100, seed=4).interactions.equals(a.interactions)


def test_text_seed_gives_logs_of_any_size_one_catalogue_text():
    # Without it the texts are drawn after the log, so a bigger log gets other texts (and another embedding
    # cache key); with it, logs of 200 and 900 users share their catalogue exactly, topics included.
    small, big = make_synthetic(200, 100, seed=3, text_seed=1), make_synthetic(900, 100, seed=3, text_seed=1)
    pd.testing.assert_frame_equal(small.items, big.items)
    assert not small.interactions.equals(big.interactions)
    assert not make_synthetic(200, 100, seed=3).items.equals(make_synthetic(900, 100, seed=3).items)


def test_schema_and_string_ids(data):
    inter, items = data.interactions, data.items
    assert inter.dtypes.astype(str).to_dict() == {"user_id": "str", "item_id": "str", "rating": "float32",
                                                  "timestamp": "int64"}
    assert list(items.columns) == ["item_id", "title", "genres", "description"]
    assert inter["user_id"].str.fullmatch(r"u\d{5}").all() and items["item_id"].str.fullmatch(r"i\d{5}").all()
    assert items["item_id"].iloc[7] == "i00007"
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert inter["rating"].between(1, 5).all()
    assert inter["user_id"].nunique() == 3000  # every user has at least one interaction


def test_no_duplicate_pairs_and_increasing_timestamps(data):
    inter = data.interactions
    assert not inter.duplicated(["user_id", "item_id"]).any()
    same_user = data.user_idx[1:] == data.user_idx[:-1]
    assert (np.diff(inter["timestamp"].to_numpy())[same_user] > 0).all()


def test_activity_is_heavy_tailed(data):
    per_user = np.bincount(data.user_idx)
    assert (per_user <= 5).mean() >= 0.40
    assert (per_user >= 100).sum() >= 10
    assert 15 <= per_user.mean() <= 30


def test_item_popularity_is_long_tailed(data):
    per_item = np.sort(np.bincount(data.item_idx, minlength=2000))[::-1]
    assert per_item[:200].sum() / per_item.sum() > 0.35  # top 10% of items: > 35% of interactions (uniform: 10%)


def test_users_mostly_pick_items_of_their_topics(data):
    share = shares_topic(data, data.user_idx, data.item_idx).mean()
    assert share >= 0.8
    # Against chance: a random item shares a topic with the user far less often.
    rng = np.random.default_rng(0)
    random_items = rng.integers(0, 2000, len(data.item_idx))
    assert shares_topic(data, data.user_idx, random_items).mean() < 0.4


def test_consecutive_items_share_topics_more_than_chance(data):
    # Two-topic users: consecutive items sit in the same one of the user's topics more often than two
    # independent draws would (topic drift, not a shuffle).
    two = data.user_topics[:, 1] >= 0
    u, it = data.user_idx, data.item_topics[data.item_idx, 0]
    pairs = (u[1:] == u[:-1]) & two[u[1:]]
    same_next = (it[1:] == it[:-1])[pairs].mean()
    shuffled = np.empty_like(it)
    rng = np.random.default_rng(0)
    for user in np.flatnonzero(two)[:500]:  # per-user shuffle keeps each user's topic mix
        rows = np.flatnonzero(u == user)
        shuffled[rows] = rng.permutation(it[rows])
    mask = pairs & np.isin(u[1:], np.flatnonzero(two)[:500])
    assert same_next > (shuffled[1:] == shuffled[:-1])[mask].mean() + 0.05


def test_item_text_words_reveal_the_topics(data):
    vocab = topic_vocabulary(12)
    word_topic = {w: k for k, (_, words) in enumerate(vocab) for w in words}
    for row, topics in zip(data.items.itertuples(), data.item_topics):
        own = {int(t) for t in topics if t >= 0}
        words = re.findall(r"[a-z]+", f"{row.title} {row.description}".lower())
        topic_words = [w for w in words if w in word_topic]
        assert {word_topic[w] for w in topic_words} == own          # every topic shows, no other topic does
        assert all(w in word_topic or w in FILLER_WORDS for w in words)
        assert row.genres == ", ".join(vocab[t][0] for t in topics if t >= 0)


def test_vocabulary_beyond_twelve_topics_stays_distinct():
    vocab = topic_vocabulary(30)
    words = [w for _, ws in vocab for w in ws]
    assert len(words) == len(set(words)) == 300 and not set(words) & set(FILLER_WORDS)
    assert vocab[12][0] == "Topic12"


def test_generate_writes_a_clean_standard_dataset(tmp_path):
    counts = generate_synthetic(str(tmp_path), n_users=300, n_items=120, seed=1)
    interactions, items, report = load_dataset(str(tmp_path))
    assert counts["interactions"] == len(interactions) == report.rows_used and report.rows_quarantined == 0
    assert counts["users"] == 300 and counts["items"] == 120 == len(items)
    assert interactions["user_id"].dtype == "str"


def test_bad_arguments():
    with pytest.raises(ConfigError, match=r"n_users=0 must be a positive integer"):
        make_synthetic(0, 100)
    with pytest.raises(ConfigError, match=r"n_items=10 is too few for n_topics=12; use n_items >= 24"):
        make_synthetic(10, 10)


def test_synthetic_cli(tmp_path, capsys):
    assert main(["data", "synthetic", "--out", str(tmp_path), "--users", "50", "--items", "40", "--seed", "2"]) == 0
    assert '"users": 50' in capsys.readouterr().out
    assert (tmp_path / "interactions.parquet").exists() and (tmp_path / "items.parquet").exists()
