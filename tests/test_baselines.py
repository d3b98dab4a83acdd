"""Known answers for the baselines: planted structures each model must recover, closed forms, leakage checks."""

from dataclasses import fields, replace

import numpy as np
import pandas as pd
import pytest
import torch

from raysparse.bench.baselines import (EASE, IALS, SASRec, SASRecNet, EASETextBlend, Popularity, TextZeroShot,
                                       ease_weights, run_baselines, training_windows, zscore_rows)
from raysparse.data.dataset import index_interactions
from raysparse.data.split import Split, split_last_item
from raysparse.metrics import evaluate


def _split(rows, items):
    """rows: (user_id, item_id) in time order -> Split with no sparse cohort."""
    frame = pd.DataFrame([(u, i, t) for t, (u, i) in enumerate(rows)], columns=["user_id", "item_id", "timestamp"])
    log = index_interactions(frame, pd.DataFrame({"item_id": items}))
    return log, split_last_item(log, cohort_fraction=0.0)


def _top_unseen(model, split, user, stage="val"):
    """Item indices ranked by score for one user, training items (and the val item at test) removed."""
    scores = model.score(np.array([user]), split.model_inputs([user], stage))[0].clone()
    scores[torch.as_tensor(split.exclusions(user, stage))] = -torch.inf
    return torch.argsort(scores, descending=True, stable=True)[: split.n_items - len(split.exclusions(user, stage))]


@pytest.fixture(scope="module")
def planted():
    """Two disjoint groups: 8 users permute items a0..a6, 12 users (the more popular group) permute b0..b6.

    The probe user 'star' trains on a0..a4, holds out a5 (val) and a6 (test): at test, a6 is the only item of
    their group left, so a collaborative model must rank it first while popularity prefers the b items.
    """
    rng = np.random.default_rng(0)
    a, b = [f"a{i}" for i in range(7)], [f"b{i}" for i in range(7)]
    rows = [(f"ua{u}", item) for u in range(8) for item in rng.permutation(a)]
    rows += [(f"ub{u}", item) for u in range(12) for item in rng.permutation(b)]
    rows += [("star", item) for item in a]
    log, split = _split(rows, a + b)
    star = int(log.users.lookup(["star"])[0])
    assert log.items.to_raw([split.test_item[star]]) == ["a6"]
    return log, split, star


def test_popularity_counts_training_items_only_and_ranks_most_popular_unseen_first():
    # Training counts a=5, b=3, c=2, d=1; every user holds out e (val) and f (test), 5 times each: counting
    # held-out interactions would put e and f on top.
    rows = []
    for user, train in [("u0", "abc"), ("u1", "abc"), ("u2", "ab"), ("u3", "ad"), ("target", "a")]:
        rows += [(user, item) for item in [*train, "e", "f"]]
    log, split = _split(rows, list("abcdef"))
    model = Popularity().fit(split)
    assert model.counts.tolist() == [5, 3, 2, 1, 0, 0]
    target = int(log.users.lookup(["target"])[0])
    assert log.items.to_raw(_top_unseen(model, split, target)[:3].tolist()) == ["b", "c", "d"]


def test_ease_closed_form_on_3x3_toy():
    # G + I = 2I + J, so P = (I - J/5) / 2: diag(P) = 2/5, off-diagonal -1/10, and B_ij = -P_ij / P_jj = 1/4.
    gram = np.array([[2.0, 1, 1], [1, 2, 1], [1, 1, 2]])
    expected = (np.ones((3, 3)) - np.eye(3)) / 4
    np.testing.assert_allclose(ease_weights(gram, 1.0), expected, atol=1e-12)
    # Against a plain numpy inverse on an asymmetric case, float32 path included.
    x = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0], [1, 1, 1]], np.float64)
    p = np.linalg.inv(x.T @ x + 3.0 * np.eye(3))
    reference = np.eye(3) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(ease_weights(x.T @ x, 3.0), reference, atol=1e-12)
    np.testing.assert_allclose(ease_weights((x.T @ x).astype(np.float32), 3.0), reference, atol=1e-6)


def test_mirror_upper_is_the_symmetric_matrix_in_place_without_whole_matrix_copies():
    """Known answer: the upper triangle mirrored, across block edges (n = 300, blocks of 128), exactly what
    np.triu(p) + np.triu(p, 1).T gives, in p's own memory; and EASE's inverse step allocates well under one more
    n x n matrix (tracemalloc counts numpy's buffers), where the two np.triu copies took two."""
    import tracemalloc

    from raysparse.bench.baselines import mirror_upper

    rng = np.random.default_rng(0)
    p = np.asfortranarray(rng.standard_normal((300, 300)).astype(np.float32))
    expected = np.triu(p) + np.triu(p, 1).T
    memory = p.__array_interface__["data"][0]
    mirror_upper(p, block=128)
    np.testing.assert_array_equal(p, expected)
    assert p.__array_interface__["data"][0] == memory

    n = 3000                           # blocks of 1024 columns: their two squares are ~0.23 n x n here
    x = (rng.random((4000, n)) < 0.005).astype(np.float32)
    gram = x.T @ x
    reference = ease_weights(gram.astype(np.float64), 50.0)
    tracemalloc.start()
    try:
        weights = ease_weights(gram, 50.0, overwrite=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(weights, reference, atol=1e-4)
    assert peak < 0.5 * n * n * 4, f"EASE's inverse step allocated {peak / (n * n * 4):.2f} n x n float32 matrices"


def test_upper_gram_is_the_gram_matrix_built_in_place_and_ease_weights_do_not_change():
    """Known answers: upper_gram over chunks of users (3 chunks of 40 rows here) is the upper triangle of XᵀX to
    the last bit, EASE's weights from it are bit-equal to those from the full XᵀX, and building it allocates the
    matrix and a chunk or two, not a second n x n matrix a chunk (tracemalloc; the old sum peaked above 2)."""
    import tracemalloc

    import scipy.sparse as sp

    from raysparse.bench.baselines import upper_gram

    rng = np.random.default_rng(1)
    x = (rng.random((100, 60)) < 0.2).astype(np.float32)
    gram = upper_gram(sp.csr_matrix(x), np.float32, chunk_rows=40)
    np.testing.assert_array_equal(gram, np.triu(x.T @ x))
    assert gram.flags.f_contiguous
    np.testing.assert_array_equal(ease_weights(gram, 7.0), ease_weights(x.T @ x, 7.0))
    np.testing.assert_array_equal(ease_weights(gram.copy(order="F"), 7.0, overwrite=True), ease_weights(x.T @ x, 7.0))

    n = 2000
    rows = sp.random(3000, n, density=0.005, format="csr", random_state=0, dtype=np.float32)
    rows.data[:] = 1.0
    tracemalloc.start()
    try:
        upper_gram(rows, np.float32, chunk_rows=250)          # a chunk: 0.125 n x n; BLAS's wrapper copies it
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * n * n * 4, f"upper_gram allocated {peak / (n * n * 4):.2f} n x n float32 matrices"


def test_ease_recovers_planted_item_with_zero_diagonal(planted):
    log, split, star = planted
    model = EASE(lam=5.0).fit(split)
    assert np.all(np.diag(model.weights) == 0)
    # Scores are X B: the star's score vector is the sum of B's rows for their training items.
    rows = np.searchsorted(model.active_items, split.history(star))
    np.testing.assert_allclose(model.score(np.array([star]), [split.history(star)])[0].numpy()[model.active_items],
                               model.weights[rows].sum(0), rtol=1e-5)
    result = evaluate(model.score, split, "test", sampled=False, users=np.array([star]))
    assert result["overall"]["mrr"] == 1.0
    # Not a popularity artefact: popularity ranks the (more popular) b items first.
    popular = evaluate(Popularity().fit(split).score, split, "test", sampled=False, users=np.array([star]))
    assert popular["overall"]["mrr"] < 0.5


@pytest.mark.filterwarnings("error")  # implicit warns when a threaded BLAS runs under its own threads
def test_ials_recovers_planted_item(planted):
    log, split, star = planted
    model = IALS(factors=8, regularization=0.1, alpha=10.0, iterations=15, seed=0, num_threads=1).fit(split)
    result = evaluate(model.score, split, "test", sampled=False, users=np.array([star]))
    assert result["overall"]["mrr"] >= 0.5  # rank 1 or 2
    # Seeded: the same factors twice.
    again = IALS(factors=8, regularization=0.1, alpha=10.0, iterations=15, seed=0, num_threads=1).fit(split)
    np.testing.assert_array_equal(model.item_factors, again.item_factors)


def test_text_zero_shot_is_cosine_to_mean_of_normalized_history():
    emb = np.array([[3.0, 4, 0], [0, 0, 2], [1, 1, 1], [0, 0, 0], [-1, 2, 0.5]], np.float32)  # item 3 all zero
    # User 0 trains on items 0, 1; user 1 on nothing (a Split built by hand: the protocol never yields that).
    split = Split(n_users=2, n_items=5, train_indptr=np.array([0, 2, 2]), train_items=np.array([0, 1]),
                  train_weights=np.ones(2, np.float32), val_item=np.array([2, -1]), test_item=np.array([4, -1]),
                  cohort_k=np.zeros(2, np.int64))
    scores = TextZeroShot(emb).fit(split).score(np.array([0, 1]), split.model_inputs([0, 1], "val")).numpy()
    user = (np.array([0.6, 0.8, 0]) + np.array([0, 0, 1.0])) / 2  # mean of the unit vectors of items 0, 1
    norms = np.linalg.norm(emb, axis=1)
    expected = np.array([emb[i] @ user / (norms[i] * np.linalg.norm(user)) if norms[i] else 0.0 for i in range(5)])
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6, atol=1e-7)
    assert scores[1].tolist() == [0.0] * 5
    with pytest.raises(ValueError, match=r"item_emb must have shape \(n_items=5, H\), got \(4, 3\)"):
        TextZeroShot(emb[:4]).fit(split)


def test_blend_with_beta_zero_ranks_like_ease(planted):
    log, split, star = planted
    emb = np.random.default_rng(1).normal(size=(split.n_items, 8)).astype(np.float32)
    users = split.evaluated_users
    ease = EASE(lam=5.0).fit(split)
    blend = EASETextBlend(emb, lam=5.0, beta=0.0).fit(split)
    inputs = split.model_inputs(users, "test")
    torch.testing.assert_close(blend.score(users, inputs), zscore_rows(ease.score(users, inputs)))
    for stage in ("val", "test"):  # same ranks -> the same metrics, for every user
        assert evaluate(blend.score, split, stage, sampled=False) == evaluate(ease.score, split, stage, sampled=False)
    # z-scoring: mean 0 and std 1 per row; a constant row maps to zeros, not NaN.
    z = zscore_rows(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    torch.testing.assert_close(z[0], torch.tensor([-1.0, 0.0, 1.0]) * 1.5 ** 0.5)
    assert z[1].tolist() == [0.0, 0.0, 0.0]


def _cycle_split(n_users=120, n_items=20, length=12, seed=0):
    """Each user walks the cycle i -> i+1 mod n_items from a random start; the next item is fully determined."""
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"i{(start + t) % n_items}") for u, start in enumerate(rng.integers(0, n_items, n_users))
            for t in range(length)]
    return _split(rows, [f"i{i}" for i in range(n_items)])[1]


def test_training_windows_cover_every_transition_once():
    split = Split(n_users=2, n_items=9, train_indptr=np.array([0, 8, 9]), train_items=np.arange(9),
                  train_weights=np.ones(9, np.float32), val_item=np.array([-1, -1]), test_item=np.array([-1, -1]),
                  cohort_k=np.zeros(2, np.int64))
    inputs, targets = training_windows(split, max_len=3)
    # User 0 (ids 1..8): windows 5-8, 2-5, 1-2 from the newest end, overlapping by one item, so each of the 7
    # transitions is a target once; the oldest window is left-padded. User 1 has one item: no transition.
    assert inputs.tolist() == [[5, 6, 7], [2, 3, 4], [0, 0, 1]]
    assert targets.tolist() == [[6, 7, 8], [3, 4, 5], [0, 0, 2]]


def test_sasrec_position_sees_only_earlier_items():
    torch.manual_seed(0)
    net = SASRecNet(n_items=10, hidden_size=8, num_layers=2, num_heads=2, dropout=0.0, max_len=6).eval()
    with torch.no_grad():
        before = net(torch.tensor([[0, 0, 1, 2, 3, 4]]))
        after = net(torch.tensor([[0, 0, 1, 2, 7, 9]]))  # only positions 4, 5 change
    assert torch.isfinite(before).all()  # padding queries attend to themselves, not to nothing
    torch.testing.assert_close(before[:, :4], after[:, :4], rtol=0, atol=0)
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_sasrec_rows_cut_to_their_longest_sequence_give_the_same_outputs():
    """Training cuts each batch to its longest window; positions count back from the newest item, so the cut
    row's items keep the positions (and outputs) they have in the full max_len row."""
    torch.manual_seed(0)
    net = SASRecNet(n_items=10, hidden_size=8, num_layers=2, num_heads=2, dropout=0.0, max_len=6).eval()
    full = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 0, 5, 6, 7, 8]])
    with torch.no_grad():
        wide, narrow = net(full), net(full[:, -4:])
    torch.testing.assert_close(narrow, wide[:, -4:])        # positions counted from the left would differ here


def test_sasrec_rejects_sequences_longer_than_its_positions_and_says_how_to_cut_them():
    net = SASRecNet(n_items=10, hidden_size=8, num_layers=1, num_heads=2, dropout=0.0, max_len=6)
    with pytest.raises(ValueError, match=r"7 items but has positions for max_len=6.*seq\[:, -6:\]"):
        net(torch.ones(2, 7, dtype=torch.long))


def _branching_split(n_users=200, n_hubs=12, branches=4, length=9, seed=0):
    """Users alternate hub and branch items: after hub h comes one of its `branches` branch items, drawn at
    random; after a branch item comes its one fixed next hub. Sequences start at a hub and have odd length, so
    the validation item is a branch and the test item is that branch's fixed next hub: certain for a model that
    reads the validation item, one guess in `branches` for a model that stops at the hub before it."""
    rng = np.random.default_rng(seed)
    n_branch = n_hubs * branches
    next_hub = rng.integers(n_hubs, size=n_branch)
    rows = []
    for u in range(n_users):
        hub = int(rng.integers(n_hubs))
        for step in range(length):
            if step % 2 == 0:
                rows.append((f"u{u}", f"h{hub}"))
                branch = hub * branches + int(rng.integers(branches))
            else:
                rows.append((f"u{u}", f"b{branch}"))
                hub = int(next_hub[branch])
    return _split(rows, [f"h{i}" for i in range(n_hubs)] + [f"b{i}" for i in range(n_branch)])[1]


def test_leave_one_out_sasrec_reads_the_validation_item_at_test():
    """Standard protocol: at test SASRec reads the training history + the validation item, so the hub that
    follows the validation branch ranks first. Scored from the training history alone (the old protocol), the
    same fitted model cannot know which of 4 branches was taken, so it finds the test item about one time in 4."""
    split = _branching_split()
    model = SASRec(hidden_size=32, num_layers=1, dropout=0.1, epochs=30, batch_size=32, lr=1e-2, seed=0,
                   num_threads=1).fit(split)
    assert evaluate(model.score, split, "test", ks=(1,), sampled=False)["overall"]["hr@1"] >= 0.9
    history_only = lambda users, inputs: model.score(users, [split.history(int(u)) for u in users])
    assert evaluate(history_only, split, "test", ks=(1,), sampled=False)["overall"]["hr@1"] <= 0.5


def test_sasrec_learns_a_planted_cycle():
    split = _cycle_split()
    model = SASRec(hidden_size=32, num_layers=1, dropout=0.1, epochs=40, batch_size=32, lr=1e-2, seed=0,
                   num_threads=1).fit(split)
    result = evaluate(model.score, split, "val", ks=(1,), sampled=False)
    assert result["overall"]["hr@1"] >= 0.9
    assert max(r["val_ndcg@10"] for r in model.history) == pytest.approx(
        evaluate(model.score, split, "val", ks=(10,), sampled=False)["overall"]["ndcg@10"])  # best weights kept


def test_sasrec_is_deterministic_given_seed():
    split = _cycle_split(n_users=30)
    scores = [SASRec(hidden_size=16, num_layers=1, epochs=2, batch_size=8, seed=3, num_threads=1).fit(split)
              .score(np.arange(5), split.model_inputs(np.arange(5), "val")) for _ in range(2)]
    assert torch.equal(scores[0], scores[1])


class _ValOnlySplit(Split):
    """A split whose test targets cannot be read through the protocol's accessors."""

    def targets(self, stage):
        assert stage != "test", "tuning read the test targets"
        return super().targets(stage)

    def exclusions(self, user_idx, stage):
        assert stage != "test", "tuning read the test exclusions"
        return super().exclusions(user_idx, stage)


def _val_only(split):
    return _ValOnlySplit(**{f.name: getattr(split, f.name) for f in fields(split)})


def test_tuning_uses_validation_only(planted):
    log, split, star = planted
    emb = np.random.default_rng(1).normal(size=(split.n_items, 8)).astype(np.float32)
    scrambled = replace(split, test_item=np.where(split.test_item >= 0,
                                                  np.random.default_rng(2).permutation(split.test_item), -1))
    tunes = {
        "popularity": lambda s: Popularity.tune(s),
        "ease": lambda s: EASE.tune(s, {"lam": [1.0, 10.0, 100.0, 1000.0]}),
        "ials": lambda s: IALS.tune(s, {"factors": [4, 8], "regularization": [0.1], "alpha": [1.0, 10.0]},
                                   num_threads=1),
        "text": lambda s: TextZeroShot.tune(s, item_emb=emb),
        "ease_text": lambda s: EASETextBlend.tune(s, {"beta": [0.0, 1.0]}, item_emb=emb, lam=10.0),
        "sasrec": lambda s: SASRec.tune(s, {"num_layers": [1], "dropout": [0.1, 0.3]}, hidden_size=8, epochs=2,
                                          num_threads=1),
    }
    for name, tune in tunes.items():
        params, ndcg = tune(_val_only(split))
        assert tune(scrambled) == (params, ndcg), name
        assert 0.0 <= ndcg <= 1.0


def test_run_baselines_reports_tuned_params_and_both_stages():
    # 130 items so the sampled protocol (100 unseen negatives per user) applies.
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(u % 2) * 65 + j}") for u in range(40) for j in rng.choice(65, 8, replace=False)]
    log, split = _split(rows, [f"i{i}" for i in range(130)])
    emb = rng.normal(size=(130, 8)).astype(np.float32)
    names = ["popularity", "ease", "ials", "text", "ease_text", "sasrec", "sasrec_text"]
    results = run_baselines(split, emb, names, seed=0, fast=True, num_threads=1)
    assert list(results) == names
    for name, result in results.items():
        assert {"overall", "warm", "cohort", "sampled100/overall"} <= set(result["test"]), name
        assert result["val"]["overall"]["users"] == 40 and result["fit_seconds"] >= 0
    assert results["ease_text"]["params"]["lam"] == results["ease"]["params"]["lam"]
    assert results["ease"]["val"]["overall"]["ndcg@10"] == pytest.approx(results["ease"]["tune_val_ndcg@10"])
    # SASRec + text prior: weight 0 (SASRec alone) is in its grid, so validation can only rise; the chosen
    # blend's validation NDCG@10 is what evaluate() reports for it.
    blended = results["sasrec_text"]
    assert set(blended["params"]) == {"weight", "items", "form"} and blended["params"]["form"] in ("mean", "max")
    assert blended["val"]["overall"]["ndcg@10"] >= results["sasrec"]["val"]["overall"]["ndcg@10"] - 1e-9
    assert blended["val"]["overall"]["ndcg@10"] == pytest.approx(blended["tune_val_ndcg@10"])


def test_errors_name_the_argument_and_the_fix(planted):
    log, split, star = planted
    with pytest.raises(ValueError, match=r"unknown baseline names \['bpr'\]; choose from"):
        run_baselines(split, None, ["ease", "bpr"], seed=0)
    with pytest.raises(ValueError, match="need item_emb"):
        run_baselines(split, None, ["text"], seed=0)
    with pytest.raises(ValueError, match="'sasrec_text' blends the fitted SASRec: list 'sasrec' before it"):
        run_baselines(split, np.zeros((split.n_items, 4), np.float32), ["sasrec_text"], seed=0)
    with pytest.raises(ValueError, match="EASE lam must be > 0"):
        EASE(lam=0.0).fit(split)
    with pytest.raises(ValueError, match="stage_for_tuning must be 'val'.*got 'test'"):
        SASRec().fit(split, stage_for_tuning="test")
    with pytest.raises(RuntimeError, match=r"call \.fit\(split\)"):
        EASE().score(np.array([0]), [np.array([1])])
