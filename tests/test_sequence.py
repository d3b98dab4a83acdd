"""History attention (model.history_encoder='attention'): known answers on planted orders, padding, text users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from raysparse.build import prepare_data
from raysparse.config import config_from_dict
from raysparse.errors import ConfigError
from raysparse.local import run_local
from raysparse.model.sequence import HistoryAttention


def walks(n_users: int = 160, n_items: int = 24, length: int = 8, seed: int = 0):
    """Each user walks the item ring one step at a time, half of them forwards and half backwards, from a random
    start. The last two items give the direction, so the held-out next item is known; a model that ignores
    order sees the same pair {x, x+1} for a forward user ending at x+1 and a backward user ending at x."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{i:02d}" for i in range(n_items)],
                          "title": [f"film {i}" for i in range(n_items)]})
    rows = []
    for u in range(n_users):
        step = 1 if u % 2 == 0 else -1
        start = int(rng.integers(0, n_items))
        for t in range(length):
            rows.append((f"u{u:03d}", f"i{(start + step * t) % n_items:02d}", 1000 + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), items


def walk_config(tmp_path, variant: str = "dmf", text_model: str = "", example_mode: str = "prefix", **model):
    base = {"variant": variant, "text_model": text_model, "finetune": "frozen", "history_encoder": "attention",
            "attention_dim": 32, "attention_layers": 1, "attention_heads": 2, "fusion_dim": 32,
            "residual_hidden_dim": 32, "text_dim": 16,
            "dmf_user_layers": [32], "dmf_item_layers": [32], "dropout": 0.0, "modality_dropout": 0.0}
    base.update(model)
    return config_from_dict({
        "output": str(tmp_path), "data": {"text_template": "{title}", "max_length": 16, "cohort_fraction": 0},
        "model": base,
        "train": {"epochs": 30, "batch_size_per_worker": 64, "negatives_per_positive": 0, "lr": 0.01,
                  "short_history_prob": 0.0, "example_mode": example_mode}})


@pytest.mark.parametrize("example_mode,fusion,variant", [("prefix", "concat", "dmf"), ("sequence", "concat", "dmf"),
                                                        ("sequence", "residual", "dmf"),
                                                        ("sequence", "residual", "ids")])
def test_attention_learns_the_direction_of_a_walk(tmp_path, example_mode, fusion, variant):
    """Known answer: the test item is the walk's next step after the validation item (which the model reads at
    test); it must rank first for nearly every user, which needs the order of the last items, not just their
    set. 'ids' is the sequence model with no DMF tower at all."""
    torch.manual_seed(0)
    cfg = walk_config(tmp_path, variant=variant, example_mode=example_mode, fusion=fusion)
    _, summary = run_local(cfg, prepare_data(cfg, walks()), log=lambda s: None, save=False)
    # The recency-weighted bag (history_encoder=bag) reaches MRR ~0.92 here; attention gets every user right.
    assert summary["test"]["test/overall/mrr"] >= 0.97, summary["test"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return HistoryAttention(n_items=12, dim=16, layers=2, heads=2, dropout=0.0, text_hidden=8,
                            use_item_ids=True).eval()


def _bags(histories):
    items = torch.tensor([i for h in histories for i in h], dtype=torch.long)
    offsets = torch.tensor(np.cumsum([0] + [len(h) for h in histories[:-1]]), dtype=torch.long)
    positions = torch.tensor([p for h in histories for p in range(len(h))], dtype=torch.long)
    return items, offsets, positions


def test_a_users_vector_does_not_depend_on_the_rest_of_the_batch(encoder):
    text = torch.randn(12, 8)
    alone = encoder(*_bags([[3, 1]]), text)
    together = encoder(*_bags([[5, 6, 7, 8, 9], [3, 1], []]), text)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(together[2]).all()                    # an empty history is a finite vector


def test_order_changes_the_vector_and_text_users_are_one_token(encoder):
    text = torch.randn(12, 8)
    forward, backward = encoder(*_bags([[3, 4], [4, 3]]), text)
    assert not torch.allclose(forward, backward)
    query = torch.randn(2, 8)
    empty = _bags([[], []])
    by_text = encoder(*empty, text, query_emb=query)
    assert not torch.allclose(by_text[0], by_text[1])          # different texts, different users


def test_attention_with_a_fine_tuned_text_tower_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="finetune=frozen"):
        walk_config(tmp_path, variant="fused", finetune="top")
    with pytest.raises(ConfigError, match="must divide"):
        walk_config(tmp_path, attention_heads=3)


def test_bce_loss_is_dmf_binary_cross_entropy_with_negatives_averaged_per_example():
    import math

    from raysparse.step import compute_loss

    # All logits 0: -log sigmoid(0) for the target + the mean of -log(1 - sigmoid(0)) over valid negatives
    # = 2 log 2 per example, whatever the number of valid negatives; an example without one keeps log 2.
    pos, cand = torch.zeros(3), torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got = compute_loss({"pos": pos, "cand": cand, "neg_mask": mask}, "bce")
    assert math.isclose(float(got), (2 * math.log(2) * 2 + math.log(2)) / 3, rel_tol=1e-6)
    # A confident, correct example (target +10, negatives -10) costs almost nothing.
    sure = compute_loss({"pos": torch.tensor([10.0]), "cand": torch.full((1, 4), -10.0),
                         "neg_mask": torch.ones(1, 4, dtype=torch.bool)}, "bce")
    assert float(sure) < 1e-4


def test_softmax_loss_is_cross_entropy_over_the_target_and_its_valid_negatives():
    from raysparse.step import compute_loss

    torch.manual_seed(0)
    pos, cand = torch.randn(5), torch.randn(5, 7)
    mask = torch.rand(5, 7) > 0.4
    mask[0] = False                                            # no valid negative: loss 0
    expected = []
    for i in range(5):
        logits = torch.cat([pos[i:i + 1], cand[i][mask[i]]])
        expected.append(torch.nn.functional.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long)))
    got = compute_loss({"pos": pos, "cand": cand, "neg_mask": mask}, "softmax")
    torch.testing.assert_close(got, torch.stack(expected).mean())


def test_masked_logsumexp_matches_autograd_in_value_and_gradient():
    """The chunked logsumexp behind the softmax loss equals the plain masked one, gradient included, over
    more rows than one chunk; a row with nothing masked in gives -inf and no gradient."""
    from raysparse.step import MaskedLogSumExp

    torch.manual_seed(0)
    logits = torch.randn(MaskedLogSumExp.CHUNK_ROWS * 2 + 5, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(logits.shape) > 0.3
    mask[3] = False
    weights = torch.randn(logits.shape[0], dtype=torch.float64)
    got = MaskedLogSumExp.apply(logits, mask)
    assert got[3] == float("-inf")
    (got[mask.any(1)] * weights[mask.any(1)]).sum().backward()
    grad, logits.grad = logits.grad, None
    reference = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), 1)
    torch.testing.assert_close(got, reference.detach())
    (reference[mask.any(1)] * weights[mask.any(1)]).sum().backward()
    torch.testing.assert_close(grad, logits.grad)
    assert not grad[3].any() and not grad[~mask].any()


def test_each_position_equals_the_model_run_on_its_prefix_alone(encoder):
    """Causal attention with distance-only positions: one pass gives every prefix's user (what sequence-mode
    training relies on); window k reads the row as blocks of k items, each position a user of 1..k items."""
    from raysparse.model.sequence import PAD

    text = torch.randn(12, 8)
    items = [4, 9, 2, 7, 11]
    seq = torch.tensor([[PAD, PAD] + items])
    every = encoder.forward_sequence(seq, text)[0]                              # (7, dim)
    windowed = encoder.forward_sequence(seq, text, window=torch.tensor([2]))[0]
    for t in range(1, len(items) + 1):
        prefix = items[:t]
        alone = encoder(*_bags([prefix[::-1]]), text)[0]                        # bags are newest first
        torch.testing.assert_close(every[1 + t], alone, rtol=1e-4, atol=1e-5)
        # window 2 from the newest end: blocks {11, 7}, {2, 9}, {4}; a position reads its block up to itself
        block = [[4], [9], [9, 2], [7], [7, 11]][t - 1]
        cut = encoder(*_bags([block[::-1]]), text)[0]
        torch.testing.assert_close(windowed[1 + t], cut, rtol=1e-4, atol=1e-5)


def test_sequence_batches_predict_the_next_items_and_never_show_them(tmp_path):
    """On the walks each target is one step along the user's ring from the input at its position (known
    answer: the next item), is never among the items that position reads, and each user's row of neg_mask hides
    their items."""
    from raysparse.build import build_batches

    frames = walks(n_users=20, n_items=24, length=8)
    cfg = walk_config(tmp_path, example_mode="sequence").replace(**{"data.max_history": 4,
                                                                    "train.short_history_prob": 0.5})
    prepared = prepare_data(cfg, frames)
    builder = build_batches(cfg, prepared.split, None)
    users, targets, ends = builder.training_examples("sequence")
    # Windows of 4 transitions sharing one item: a 7-item training sequence (8 minus validation... the test
    # item is held out too) gives windows ending at items 6 and 2.
    lengths = prepared.split.history_lengths()
    assert len(users) == sum(len(range(n - 1, 0, -4)) for n in lengths)
    batch = builder.training_batch(users, targets, ends, "sequence", np.random.default_rng(0))
    seq, window = batch["seq"].numpy(), batch["window"].numpy()
    item_index = {raw: i for i, raw in enumerate(prepared.log.items.raw_ids)}
    number = {i: int(raw[1:]) for raw, i in item_index.items()}
    cand = batch["cand_items"].numpy()
    pred_row, pred_col = batch["pred_row"].tolist(), batch["pred_col"].tolist()
    assert len(batch["target_pos"]) == len(pred_row)        # one target a position
    for row, col, tpos in zip(pred_row, pred_col, batch["target_pos"].tolist()):
        target = int(cand[tpos])
        assert target not in seq[row, :col + 1]             # what the position reads is a subset of this
        step = (number[target] - number[int(seq[row, col])]) % 24
        assert step in (1, 23), (row, col, step)            # the next item along the ring, either way round
    # every input position is scored once
    assert sorted(zip(pred_row, pred_col)) == sorted(set(zip(pred_row, pred_col)))
    assert len(pred_row) == int((seq >= 0).sum())
    mask = batch["neg_mask"].numpy()
    assert mask.shape == (len(pred_row), len(cand))
    for i, row in enumerate(batch["pred_row"].tolist()):
        seen = prepared.split.history(int(batch["user_idx"][row]))
        assert not mask[i, np.searchsorted(cand, seen)].any()


@pytest.mark.parametrize("fusion", ["concat", "residual"])
def test_sequence_users_equal_the_users_of_the_histories_they_read(tmp_path, fusion):
    """One causal pass + running DMF sums give, for every prediction, the user vector that scoring the history
    it reads would give (eval mode): training on sequences trains the model that serving runs."""
    from raysparse.build import build_batches
    from raysparse.local import build_recommender

    cfg = walk_config(tmp_path, example_mode="sequence", fusion=fusion).replace(**{"data.max_history": 5,
                                                                    "train.short_history_prob": 0.5})
    prepared = prepare_data(cfg, walks(n_users=12, length=8))
    rec = build_recommender(cfg, prepared)
    builder = build_batches(cfg, prepared.split, None)
    users, targets, ends = builder.training_examples("sequence")
    batch = builder.training_batch(users, targets, ends, "sequence", np.random.default_rng(1))
    assert (batch["window"] > 0).any() and (batch["window"] == 0).any()
    model = rec.model.eval()
    with torch.no_grad():
        for param in model.parameters():          # residual fusion starts its DMF projections at zero:
            if not param.abs().sum():             # give them weights, so the DMF path is compared too
                param.normal_(std=0.1)
        got = model.sequence_users(batch)
        seq, window, length = batch["seq"], batch["window"], batch["seq"].shape[1]
        histories = []
        for row, col in zip(batch["pred_row"].tolist(), batch["pred_col"].tolist()):
            k = int(window[row])
            start = length - ((length - 1 - col) // k + 1) * k if k > 0 else 0
            read = seq[row, max(start, 0):col + 1]
            histories.append(read[read >= 0].numpy()[::-1].copy())          # newest first
        expected = model.user_vectors(builder.user_inputs(histories))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sequence_batches_are_as_wide_as_their_longest_window_and_the_padding_they_skip_changes_nothing(tmp_path):
    """Users of 8 items (6 training: windows of 5 inputs) under max_history 20: the batch is 5 wide, not 20; the
    same batch padded on the left to 20 (pred_col shifted) gives the same training logits, whole rows and
    short-history blocks alike, and the same loss."""
    from raysparse.build import build_batches
    from raysparse.local import build_recommender
    from raysparse.model.sequence import PAD
    from raysparse.step import compute_loss

    cfg = walk_config(tmp_path, example_mode="sequence", fusion="residual").replace(**{
        "data.max_history": 20, "train.short_history_prob": 0.5})
    prepared = prepare_data(cfg, walks(n_users=12, length=8))
    rec = build_recommender(cfg, prepared)
    builder = build_batches(cfg, prepared.split, None)
    users, targets, ends = builder.training_examples("sequence")
    batch = builder.training_batch(users, targets, ends, "sequence", np.random.default_rng(1))
    assert batch["seq"].shape == (len(users), 5)
    assert (batch["seq"][:, 0] >= 0).all()                      # every window fills the width: nothing to trim
    assert (batch["window"] > 0).any() and (batch["window"] == 0).any()
    extra = 20 - 5
    padded = dict(batch)
    padded["seq"] = torch.nn.functional.pad(batch["seq"], (extra, 0), value=PAD)
    padded["seq_weights"] = torch.nn.functional.pad(batch["seq_weights"], (extra, 0), value=0.0)
    padded["pred_col"] = batch["pred_col"] + extra
    model = rec.model.eval()
    with torch.no_grad():
        for param in model.parameters():          # residual fusion starts its DMF projection at zero: give it
            if not param.abs().sum():             # weights, so the DMF row's running sums are compared too
                param.normal_(std=0.1)
        narrow, wide = model(batch), model(padded)
    torch.testing.assert_close(narrow["cand"], wide["cand"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(narrow["pos"], wide["pos"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compute_loss(narrow, "softmax"), compute_loss(wide, "softmax"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["concat", "residual"])
def test_fused_attention_artifact_round_trip_serves_all_three_paths(tmp_path, frames, tiny_encoder, fusion):
    """Trained in sequence mode, saved, loaded: the same scores for a known user, a new user's history and a
    text-only user (one text token), and the known user's items are excluded; older artifacts with the
    text tower's unused projection, or (residual) with the DMF projection's width in model.fusion_dim, still
    load."""
    import json

    from raysparse.recommender import Recommender

    cfg = walk_config(tmp_path, variant="fused", text_model=tiny_encoder, example_mode="sequence",
                      fusion=fusion, residual_hidden_dim=24).replace(
        **{"train.epochs": 1, "data.text_template": "{title}. {genres}", "data.max_length": 24})
    rec, _ = run_local(cfg, prepare_data(cfg, frames), log=lambda s: None, save=True)
    # The attention reads the cached item text itself: the text tower holds no user projection of its own.
    assert not {"text.proj.weight", "text.recency_logits"} & set(rec.model.state_dict())
    loaded = Recommender.load(tmp_path / "artifact")
    # An artifact saved when the tower still carried those (never read) weights loads to the same answers.
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "artifact" / "model.safetensors"))
    hidden = state["text.item_text_emb"].shape[1]
    state.update({"text.proj.weight": torch.ones(16, hidden), "text.proj.bias": torch.ones(16),
                  "text.recency_logits": torch.ones(50)})
    save_file(state, str(tmp_path / "artifact" / "model.safetensors"))
    old = Recommender.load(tmp_path / "artifact")
    # An artifact saved before model.residual_hidden_dim existed: its config has no such key, and fusion_dim
    # held the residual projection's width (24 here; today's default, 128, would not fit its weights).
    saved = json.loads((tmp_path / "artifact" / "config.json").read_text())
    del saved["model"]["residual_hidden_dim"]
    saved["model"]["fusion_dim"] = 24 if fusion == "residual" else saved["model"]["fusion_dim"]
    (tmp_path / "artifact" / "config.json").write_text(json.dumps(saved))
    older = Recommender.load(tmp_path / "artifact")
    assert older.config.model.residual_hidden_dim == (24 if fusion == "residual" else 128)
    for kwargs in ({"user_ids": ["u000"]}, {"histories": [["i001", "i005"]]}, {"texts": ["space robots"]}):
        answers = [r.recommend(**kwargs, k=5)[0] for r in (rec, loaded, old, older)]
        for other in answers[1:]:
            assert [r.item_id for r in other] == [r.item_id for r in answers[0]]
            np.testing.assert_allclose([r.score for r in other], [r.score for r in answers[0]], rtol=1e-5,
                                       atol=1e-6)
    seen = set(rec.builder.split.history(int(rec.users.to_idx(["u000"])[0])).tolist())
    top = rec.recommend(user_ids=["u000"], k=10)[0]
    assert not seen & set(rec.items.to_idx([r.item_id for r in top]).tolist())


def test_residual_fusion_starts_as_the_sequence_model(tmp_path, frames, tiny_encoder):
    """model.fusion='residual': before training, the fused user vector is the history attention's output and an
    item's vector is its own input token (id embedding + projected text), as in SASRec; DMF adds nothing yet."""
    from raysparse.local import build_recommender

    cfg = walk_config(tmp_path, variant="fused", text_model=tiny_encoder, fusion="residual").replace(
        **{"data.text_template": "{title}. {genres}", "data.max_length": 24})
    prepared = prepare_data(cfg, frames)
    rec = build_recommender(cfg, prepared)
    model = rec.model.eval()
    histories = [np.array([1, 4, 2]), np.array([7])]
    with torch.no_grad():
        batch = rec.builder.user_inputs(histories)
        sequence_part = model.history(batch["hist_items"], batch["hist_offsets"], batch["hist_pos"],
                                      model.text.item_text_emb)
        torch.testing.assert_close(model.user_vectors(batch), sequence_part)
        items = torch.arange(prepared.split.n_items)
        tokens = model.history.item_emb(items) + model.history.text_in(model.text.item_text_emb[items])
        rec.refresh()
        torch.testing.assert_close(rec.item_vectors, tokens)


def test_variants_without_dmf_build_no_dmf_tower_and_need_residual_fusion(tmp_path, frames, tiny_encoder):
    """'ids_text': item id + text tokens, no DMF row and no DMF column; an item's vector is exactly its token."""
    cfg = walk_config(tmp_path, variant="ids_text", text_model=tiny_encoder, fusion="residual",
                      example_mode="sequence").replace(data={"text_template": "{title}. {genres}"},
                                                       train={"epochs": 1})
    rec, _ = run_local(cfg, prepare_data(cfg, frames), log=lambda s: None, save=False)
    model = rec.model
    assert model.dmf_user is None and model.dmf_item is None and model.history.text_in is not None
    items = torch.arange(5)
    torch.testing.assert_close(rec.item_vectors[:5], model.history.tokens(items, model.text.item_text_emb))
    with pytest.raises(ConfigError, match="model.variant='ids' reads no DMF tower.*fusion=residual"):
        walk_config(tmp_path, variant="ids", fusion="concat")


def test_text_variant_reads_no_item_ids_so_items_with_the_same_text_are_one_item(tmp_path, frames, tiny_encoder):
    """'text': tokens are the projected item text alone (no id embedding, no DMF). Two catalogue items given the
    same text are then the same item to the model: equal item vectors, and a user who read either one gets the
    same vector and the same scores."""
    interactions, items = frames
    items = items.copy()
    first, second = items["item_id"].iloc[0], items["item_id"].iloc[1]
    items.loc[1, ["title", "genres"]] = items.loc[0, ["title", "genres"]].values
    cfg = walk_config(tmp_path, variant="text", text_model=tiny_encoder, fusion="residual",
                      example_mode="sequence").replace(data={"text_template": "{title}. {genres}"},
                                                       train={"epochs": 1})
    rec, _ = run_local(cfg, prepare_data(cfg, (interactions, items)), log=lambda s: None, save=False)
    assert rec.model.history.item_emb is None and rec.model.dmf_user is None and rec.model.dmf_item is None
    a, b = rec.items.to_idx([first, second])
    torch.testing.assert_close(rec.item_vectors[a], rec.item_vectors[b])
    # New users who read one of the two (fold-in): the same scores for every item both rankings show.
    read_first, read_second = ({r.item_id: r.score for r in rec.recommend(histories=[[i]], k=20)[0]}
                               for i in (first, second))
    common = read_first.keys() & read_second.keys()
    assert len(common) >= 18
    np.testing.assert_allclose([read_first[i] for i in common], [read_second[i] for i in common], rtol=1e-5)


def test_residual_fusion_needs_history_attention(tmp_path):
    with pytest.raises(ConfigError, match="model.fusion='residual'.*history_encoder=attention"):
        walk_config(tmp_path, fusion="residual", history_encoder="bag")


def test_epochs_since_best_counts_from_the_best_epoch():
    from raysparse.step import SELECT_METRIC, epochs_since_best

    history = [{SELECT_METRIC: v} for v in (0.10, 0.30, 0.20, 0.25)]
    assert epochs_since_best(history, SELECT_METRIC) == 2
    assert epochs_since_best(history[:2], SELECT_METRIC) == 0
    assert epochs_since_best([{"loss": 1.0}], SELECT_METRIC) == 0      # no validation: never stops early


def test_early_stopping_ends_training_after_patience_epochs_without_gain(tmp_path):
    """Known answer: at a learning rate too small to change the ranking, epoch 1 stays the best, so with
    patience 2 training ends after epoch 3 of 30, and the kept model is epoch 1's."""
    cfg = walk_config(tmp_path).replace(**{"train.lr": 1e-12, "train.patience": 2, "train.epochs": 30})
    _, summary = run_local(cfg, prepare_data(cfg, walks(n_users=40)), log=lambda s: None, save=False)
    assert len(summary["history"]) == 3 and summary["best_epoch"] == 1


def test_paired_z_is_the_mean_difference_over_its_standard_error():
    from raysparse.metrics import paired_z

    best = np.linspace(0.0, 1.0, 200)
    worse = best.copy()
    worse[:20] -= 0.01
    # 20 of 200 users each 0.01 lower: mean -0.001, sd 0.01 * sqrt(20 * 180 / (200 * 199)), so z = -sqrt(20 * 199 / 180)
    assert paired_z(worse - best) == pytest.approx(-np.sqrt(20 * 199 / 180))
    assert paired_z(best - worse) == pytest.approx(np.sqrt(20 * 199 / 180))
    assert paired_z(best - best) == 0.0
    steps = np.arange(200) / 256                      # binary fractions: + 0.125 is exact for every user
    assert paired_z(steps + 0.125 - steps) == np.inf     # every user better by the same amount


def test_records_for_other_readers_are_strict_json():
    import json

    from raysparse.metrics import strict_json

    record = {"epoch": np.int64(3), "z_vs_best": -np.inf, "val": [np.float32(0.5), float("nan"), np.inf], "ok": 0.25}
    text = strict_json(record)
    assert text == '{"epoch": 3.0, "z_vs_best": null, "val": [0.5, null, null], "ok": 0.25}'
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON token {name}"))
    assert record["z_vs_best"] == -np.inf                 # the record itself keeps its value


def test_epochs_significantly_worse_counts_the_last_epochs_in_a_row():
    from raysparse.step import Z_VS_BEST, epochs_significantly_worse

    history = [{}, {Z_VS_BEST: 3.0}, {Z_VS_BEST: -2.5}, {Z_VS_BEST: -1.0}, {Z_VS_BEST: -4.0}, {Z_VS_BEST: -2.1}]
    assert epochs_significantly_worse(history, 2.0) == 2
    assert epochs_significantly_worse(history, 0.5) == 4
    assert epochs_significantly_worse(history[:3], 2.0) == 1
    assert epochs_significantly_worse(history[:2], 2.0) == 0
    assert epochs_significantly_worse([{"loss": 1.0}], 2.0) == 0      # no per-user validation: never stops early


class _StillWeight:
    """A `raysparse.loop.Stepper` whose steps change nothing: the epochs' validation is planted by the test."""

    def __init__(self):
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)

    def start_epoch(self) -> None:
        pass

    def step(self, batch) -> float:
        return 0.0


def planted_validation(n_users: int = 200) -> list[np.ndarray]:
    """Per-user validation NDCG@10 of six epochs: epoch 2 better than epoch 1 by the same for every user (binary
    fractions, exact: z = +inf); epoch 3 lower than epoch 2 for 3 users (z = -sqrt(3 * 199 / 197) = -1.74,
    noise); epochs 4-6 lower for 20 users (z = -sqrt(20 * 199 / 180) = -4.70)."""
    first = np.arange(n_users) / 512
    second = first + 1 / 16
    third, later = second.copy(), second.copy()
    third[:3] -= 1 / 128
    later[:20] -= 1 / 128
    return [first, second, third, later, later, later]


def run_planted(tc, epochs: list[np.ndarray], history=(), best=None) -> list[dict]:
    from raysparse.loop import train_epochs
    from raysparse.step import SELECT_METRIC, USER_NDCG

    batch = {"user_idx": torch.zeros(1)}
    return train_epochs(tc, _StillWeight(), lambda epoch: [batch], steps=1, batch_size=1,
                        report=lambda record, history: None, history=history, best=best,
                        evaluate=lambda epoch: {SELECT_METRIC: float(epochs[epoch - 1].mean()),
                                                USER_NDCG: epochs[epoch - 1]})


def test_patience_z_stops_on_drops_beyond_noise_and_not_on_noise():
    """Known answer on planted validation: patience 2 alone stops after epoch 4 (epochs 3 and 4 not better than
    2); with patience_z 2 epoch 3's drop is noise (z -1.74), so the two epochs in a row below the best beyond
    2 standard errors are 4 and 5, and training stops after epoch 5; at patience_z 5 no drop counts and all six
    epochs train."""
    from raysparse.config import TrainConfig
    from raysparse.step import USER_NDCG, Z_VS_BEST

    epochs = planted_validation()
    by_count = run_planted(TrainConfig(epochs=6, patience=2), epochs)
    assert [r["epoch"] for r in by_count] == [1, 2, 3, 4]
    by_noise = run_planted(TrainConfig(epochs=6, patience=2, patience_z=2.0), epochs)
    assert [r["epoch"] for r in by_noise] == [1, 2, 3, 4, 5]
    assert Z_VS_BEST not in by_noise[0] and by_noise[1][Z_VS_BEST] == np.inf
    assert [round(r[Z_VS_BEST], 2) for r in by_noise[2:]] == [-1.74, -4.70, -4.70]
    assert not any(USER_NDCG in r for r in by_noise)                 # per-user values stay out of the records
    assert len(run_planted(TrainConfig(epochs=6, patience=2, patience_z=5.0), epochs)) == 6


def test_a_run_restored_with_the_best_epochs_values_stops_where_the_uninterrupted_run_does(tmp_path):
    """Known answer: the uninterrupted run stops after epoch 5 (test above). Stopped after epoch 3 and restored
    from a checkpoint folder with BestEpoch's file, the run pairs epochs 4-5 with epoch 2 as before: the same
    records, z values included, and the same stop."""
    from raysparse.config import TrainConfig
    from raysparse.loop import BestEpoch

    tc = TrainConfig(epochs=6, patience=2, patience_z=2.0)
    epochs = planted_validation()
    uninterrupted = run_planted(tc, epochs)
    best = BestEpoch()
    first_three = run_planted(TrainConfig(epochs=3, patience=2, patience_z=2.0), epochs, best=best)
    best.save(tmp_path)
    resumed = run_planted(tc, epochs, history=first_three, best=BestEpoch.load(tmp_path, first_three))
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [{k: v for k, v in r.items() if k not in ("train_seconds", "examples_per_s", "steady_examples_per_s",
                                                     "steady_examples_per_cpu_s", "restored_from_epoch")}
            for r in resumed] == [{k: v for k, v in r.items() if k not in ("train_seconds", "examples_per_s",
                                                                          "steady_examples_per_s",
                                                                          "steady_examples_per_cpu_s")}
                                  for r in uninterrupted]


def test_patience_z_in_a_run_restored_without_the_best_epochs_values_waits_for_a_new_best():
    """A checkpoint without the best epoch's per-user values (written before they were kept): the restored
    epochs below the restored best carry no z and do not count, so all of them train (patience 1 by epochs
    alone would stop after the first)."""
    from raysparse.config import TrainConfig
    from raysparse.step import SELECT_METRIC, Z_VS_BEST

    epochs = planted_validation()
    restored = [{"epoch": 1, SELECT_METRIC: 0.9}]        # better than any planted epoch
    history = run_planted(TrainConfig(epochs=4, patience=1, patience_z=2.0), epochs, history=restored)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4] and not any(Z_VS_BEST in r for r in history)


def test_patience_z_without_patience_is_refused():
    from raysparse.config import TrainConfig

    with pytest.raises(ConfigError, match="train.patience_z=2.0 counts epochs for train.patience, which is 0"):
        TrainConfig(patience_z=2.0)


def test_keep_freed_memory_lets_a_second_large_tensor_reuse_the_pages_of_the_first():
    """With the setting a freed 100 MB tensor's pages are reused by the next ones (almost no new page faults,
    once the heap has grown); without it each allocation is a fresh mmap that faults in all its pages again."""
    import subprocess
    import sys

    script = """
import resource, sys, torch
from raysparse.step import keep_freed_memory
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
def faults_of_one_big_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(25_000_000)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
# glibc settles its heap over the first few (two or three, run to run): the fewest faults of six
print(min(faults_of_one_big_tensor() for _ in range(6)))
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("keep", "default")}
    assert faults["default"] > 20_000          # 100 MB / 4 KiB pages, faulted in again
    assert faults["keep"] < 1_000, faults


def test_residual_batches_carry_no_item_columns_and_train_to_the_same_loss(tmp_path):
    """Under residual fusion nothing reads an item's column (the users who have it), so the batches leave them
    out; the logits are the same as with the columns in, and concat fusion, which reads them, still gets them."""
    from raysparse.data.examples import BatchBuilder
    from raysparse.local import build_recommender

    cfg = walk_config(tmp_path, example_mode="sequence", fusion="residual")
    prepared = prepare_data(cfg, walks(n_users=12, length=8))
    rec = build_recommender(cfg, prepared)
    assert rec.builder.columns is None
    users, targets, ends = rec.builder.training_examples("sequence")
    lean = rec.builder.training_batch(users, targets, ends, "sequence", np.random.default_rng(1))
    full_builder = BatchBuilder(prepared.split, None, max_history=cfg.data.max_history, max_length=16,
                                negatives=0, with_tokens=False, short_history_prob=0.0)
    full = full_builder.training_batch(users, targets, ends, "sequence", np.random.default_rng(1))
    # full softmax: every item is a candidate, so the columns hold every training pair (6 a user: 8 - val - test)
    assert lean["col_users"].numel() == 0 and full["col_users"].numel() == 12 * 6
    model = rec.model.eval()
    with torch.no_grad():
        got, expected = model.forward_sequence(lean), model.forward_sequence(full)
    torch.testing.assert_close(got["cand"], expected["cand"])
    torch.testing.assert_close(got["pos"], expected["pos"])
    concat = build_recommender(walk_config(tmp_path, example_mode="sequence", fusion="concat"), prepared)
    assert concat.builder.columns is not None
