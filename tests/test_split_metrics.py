"""Known answers for the last-item protocol and the ranking metrics."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from raysparse.data.dataset import index_interactions
from raysparse.data.split import split_last_item
from raysparse.metrics import (evaluate, evaluate_ranks, metrics_from_ranks, ranks_from_scores,
                               sampled_candidates)


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


def test_one_scoring_pass_serves_full_and_sampled_ranking():
    # 3 evaluated users, 130 items (so 100 unseen candidates exist); the scorer ranks items by a fixed score.
    items = [f"i{n:03d}" for n in range(130)]
    rows = [(u, items[(7 * t + 11 * j) % 130], t) for j, u in enumerate("abc") for t in range(5)]
    log = _log(rows, items=items)
    split = split_last_item(log, cohort_fraction=0.0)
    users = split.evaluated_users
    assert len(users) == 3
    item_score = torch.tensor([float((37 * n) % 130) for n in range(130)])
    calls = []

    def score_fn(batch, inputs):
        calls.append(len(batch))
        return item_score.repeat(len(batch), 1)

    result, full = evaluate_ranks(score_fn, split, "test", batch_size=2, sampled=True, seed=3)
    assert calls == [2, 1]      # each batch scored once for both protocols
    candidates = sampled_candidates(split, users, "test", n=100, seed=3)
    full_expected, sampled_expected = [], []
    for row, u in enumerate(users):
        # By hand: the held-out item's rank among all items outside the test input (the training history + the
        # validation item), and among itself + its 100 seeded candidates.
        target = int(split.test_item[u])
        excluded = set(split.model_input(int(u), "test").tolist())
        full_expected.append(1 + sum(1 for i in range(130) if i not in excluded and item_score[i] > item_score[target]))
        sampled_expected.append(1 + int((item_score[candidates[row]] > item_score[target]).sum()))
    assert full.tolist() == full_expected
    assert len(set(full_expected)) > 1 and full_expected != sampled_expected      # the answers tell users apart
    assert result["sampled100/overall"]["mrr"] == pytest.approx(np.mean([1 / r for r in sampled_expected]))
    assert result["overall"]["mrr"] == pytest.approx(np.mean([1 / r for r in full_expected]))
    assert evaluate(score_fn, split, "test", batch_size=2, sampled=True, seed=3) == result
