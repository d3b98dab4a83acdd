"""Known answers for the last-item protocol and the ranking metrics."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from raysparse.data.dataset import index_interactions
from raysparse.data.split import split_last_item
from raysparse.metrics import evaluate, metrics_from_ranks, ranks_from_scores


def _log(rows, items=None):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = items or sorted(set(frame["item_id"]))
    return index_interactions(frame, pd.DataFrame({"item_id": items}))


def test_split_orders_by_time_then_file_order_and_holds_out_last_two():
    # user a: timestamps out of file order; the tie at t=5 keeps file order (x before y).
    log = _log([("a", "z", 9), ("a", "x", 5), ("a", "y", 5), ("a", "w", 1), ("b", "x", 1), ("b", "y", 2)],
               items=["w", "x", "y", "z"])
    split = split_last_item(log, cohort_fraction=0.0)
    a, b = 0, 1
    assert log.items.to_raw(split.history(a)) == ["w", "x"]
    assert log.items.to_raw([split.val_item[a]]) == ["y"]
    assert log.items.to_raw([split.test_item[a]]) == ["z"]
    # b has 2 interactions: training only, not evaluated.
    assert log.items.to_raw(split.history(b)) == ["x", "y"]
    assert split.val_item[b] == -1 and split.test_item[b] == -1
    assert split.evaluated_users.tolist() == [a]


def test_repeat_consumption_keeps_latest_so_target_is_never_in_training():
    log = _log([("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "w", 4), ("a", "x", 5)])
    split = split_last_item(log, cohort_fraction=0.0)
    assert log.items.to_raw([split.test_item[0]]) == ["x"]
    assert "x" not in log.items.to_raw(split.history(0))
    assert split.stats["repeat_interactions_collapsed"] == 1


def test_sparse_cohort_cuts_to_k_most_recent_and_removes_cut_items_everywhere():
    rows = [(f"u{u}", f"i{(u + t) % 30}", t) for u in range(40) for t in range(12)]
    log = _log(rows, items=[f"i{i}" for i in range(30)])
    split = split_last_item(log, cohort_fraction=0.5, cohort_ks=[1, 2, 3, 5], seed=3)
    cohort = np.flatnonzero(split.cohort_k > 0)
    assert len(cohort) == 20
    full = split_last_item(log, cohort_fraction=0.0)
    for u in cohort:
        k = split.cohort_k[u]
        assert split.history(u).tolist() == full.history(u)[-k:].tolist()
        cut = set(full.history(u)[:-k].tolist())
        # cut interactions are gone from item columns too
        columns = split.item_columns()
        for item in cut:
            assert columns[item, u] == 0
    assert split.stats["cut_by_cohort"] == sum(10 - split.cohort_k[u] for u in cohort)
    # seeded: same draw twice, different with another seed
    assert np.array_equal(split_last_item(log, 0.5, [1, 2, 3, 5], seed=3).cohort_k, split.cohort_k)
    assert not np.array_equal(split_last_item(log, 0.5, [1, 2, 3, 5], seed=4).cohort_k, split.cohort_k)


def test_ranks_exclude_seen_and_ties_count_against_target():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([1, 2])
    exclude = torch.tensor([[True, False, False, False], [False, False, False, False]])
    # row 0: item 0 excluded, only item 2 (0.7) beats 0.5 -> rank 2; row 1: all tied -> worst rank 4
    assert ranks_from_scores(scores, targets, exclude).tolist() == [2, 4]


def test_metrics_match_hand_computed_values():
    m = metrics_from_ranks(np.array([1, 3, 11]), ks=(5, 10))
    assert m["hr@5"] == pytest.approx(2 / 3)
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(4)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
    assert m["recall@10"] == m["hr@10"]


def test_evaluate_groups_and_excludes_validation_item_at_test():
    rows = [("a", "p", 1), ("a", "q", 2), ("a", "r", 3), ("a", "s", 4)]
    log = _log(rows, items=["p", "q", "r", "s", "t"])
    split = split_last_item(log, cohort_fraction=0.0)
    # A scorer that loves the validation item 'r', then 's', then everything else.
    order = {"r": 5.0, "s": 4.0, "t": 3.0, "p": 9.0, "q": 9.0}
    vec = torch.tensor([order[i] for i in log.items.raw_ids])
    score_fn = lambda users, inputs: vec.repeat(len(users), 1)
    val = evaluate(score_fn, split, "val", sampled=False)
    test = evaluate(score_fn, split, "test", sampled=False)
    assert val["overall"]["mrr"] == 1.0     # p, q are training items: excluded, r ranks first
    assert test["overall"]["mrr"] == 1.0    # r is the validation item: excluded at test, s ranks first
    assert set(val) == {"overall", "warm", "cohort"}


def test_use_ratings_weights_training_items_by_rating_over_the_maximum():
    # DMF's normalisation: weight = rating / max rating; without use_ratings every interaction weighs 1.
    frame = pd.DataFrame({"user_id": ["a"] * 4, "item_id": ["w", "x", "y", "z"], "timestamp": [1, 2, 3, 4],
                          "rating": [2.0, 5.0, 4.0, 1.0]})
    log = index_interactions(frame, pd.DataFrame({"item_id": ["w", "x", "y", "z"]}))
    rated = split_last_item(log, cohort_fraction=0.0, use_ratings=True)
    assert log.items.to_raw(rated.history(0)) == ["w", "x"]
    assert rated.train_weights.tolist() == pytest.approx([0.4, 1.0])      # float32
    assert split_last_item(log, cohort_fraction=0.0).train_weights.tolist() == [1.0, 1.0]
