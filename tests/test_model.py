"""Known answers for the hybrid model: planted structure, leakage, artifact round trip, the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raysparse.build import prepare_data
from raysparse.config import config_from_dict
from raysparse.data.text import render_item_texts
from raysparse.errors import UnknownIdError, UserError
from raysparse.local import build_recommender, run_local
from raysparse.recommender import Recommender
from raysparse.text_prior import blend, input_lengths, text_scores


def checkerboard(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two user groups each consume all 10 items of their group (random order). At test, the only unseen
    item of the user's group is the held-out one: it must rank first (the implicit library's known answer)."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(20)],
                          "title": [("red apple" if i < 10 else "blue ocean") + f" {i}" for i in range(20)]})
    rows = [(f"u{u}", f"i{i}", t) for u in range(60) for t, i in enumerate(rng.permutation(10) + 10 * (u % 2))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), items


def tiny_config(tmp_path, encoder: str, **model) -> object:
    base = {"variant": "fused", "text_model": encoder, "finetune": "frozen", "text_dim": 16, "fusion_dim": 16,
            "dmf_user_layers": [16], "dmf_item_layers": [16], "dropout": 0.0, "modality_dropout": 0.0}
    base.update(model)
    return config_from_dict({
        "output": str(tmp_path), "data": {"text_template": "{title}. {genres}", "max_length": 32, "cohort_fraction": 0},
        "model": base, "train": {"epochs": 10, "batch_size_per_worker": 32, "negatives_per_positive": 8, "lr": 0.02}})


@pytest.fixture(scope="module")
def checker_encoder(tmp_path_factory):
    from raysparse.model.text import build_tiny_encoder

    texts = render_item_texts(checkerboard()[1], "{title}")
    return build_tiny_encoder(tmp_path_factory.mktemp("enc"), texts + ["red apple pie"])


@pytest.mark.parametrize("variant", ["dmf", "fused"])
def test_planted_holdout_ranks_first(tmp_path, checker_encoder, variant):
    cfg = tiny_config(tmp_path, checker_encoder, variant=variant)
    _, summary = run_local(cfg, prepare_data(cfg, checkerboard()), log=lambda s: None, save=False)
    assert summary["test"]["test/overall/mrr"] == 1.0
    assert summary["test_ranks"] == [1] * summary["test"]["test/overall/users"]   # each user's rank, for pairing


# ---- leakage -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fused_top(tmp_path_factory, frames, tiny_encoder):
    cfg = config_from_dict({
        "output": str(tmp_path_factory.mktemp("run")), "data": {"text_template": "{title}. {genres}", "max_length": 24},
        "model": {"variant": "fused", "text_model": tiny_encoder, "finetune": "top", "text_dim": 16, "fusion_dim": 16,
                  "dmf_user_layers": [16], "dmf_item_layers": [16]},
        "train": {"epochs": 1, "batch_size_per_worker": 64, "negatives_per_positive": 16}})
    prepared = prepare_data(cfg, frames)
    return cfg, prepared, build_recommender(cfg, prepared)


@pytest.mark.parametrize("mode", ["prefix", "rest"])
def test_training_inputs_never_contain_the_target(fused_top, mode):
    _, prepared, rec = fused_top
    builder = rec.builder
    users, targets, positions = builder.training_examples(mode)
    histories, _ = builder.example_histories(users, positions, mode)
    assert len(users) > 100
    for u, t, p, h in zip(users, targets, positions, histories):
        assert t not in h.tolist()
        full = prepared.split.history(u)
        expected = full[:p][::-1] if mode == "prefix" else np.delete(full, p)[::-1]
        assert h.tolist() == expected[: builder.max_history].tolist()
    # The text of an example is built from its history only: same token ids as rendering that history.
    batch = builder.collate(users[:8], targets[:8], histories[:8], None, np.random.default_rng(0))
    again = builder.item_text.batch([h.tolist() for h in histories[:8]], builder.max_length)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    bags = np.split(batch["hist_items"].numpy(), batch["hist_offsets"].numpy()[1:])
    for bag, t in zip(bags, targets[:8]):
        assert t not in bag.tolist()


def test_target_score_uses_its_column_without_the_user(fused_top):
    _, _, rec = fused_top
    model, builder = rec.model.eval(), rec.builder
    users, targets, positions = builder.training_examples("prefix")
    sel = np.arange(6)
    histories, weights = builder.example_histories(users[sel], positions[sel], "prefix")
    batch = builder.collate(users[sel], targets[sel], histories, weights, np.random.default_rng(1))
    assert (batch["target_col_weight"] > 0).all()  # the user is in each target's training column
    with torch.no_grad():
        out = model(batch)
        user_vecs = model.user_vectors(batch)
        for row, (u, t) in enumerate(zip(users[sel], targets[sel])):
            col = builder.columns[t]
            keep = col.indices != u
            vec = model.item_vectors(torch.tensor([t]), torch.from_numpy(col.indices[keep].astype(np.int64)),
                                     torch.tensor([0]), torch.from_numpy(col.data[keep].astype(np.float32)))
            expected = model.score_pairs(user_vecs[row:row + 1], vec)[0]
            assert out["pos"][row] == pytest.approx(float(expected), abs=1e-5)
    # Sampled negatives never include the user's own training items.
    seen = builder.seen[users[sel]][:, batch["cand_items"].numpy()].toarray() != 0
    assert not (batch["neg_mask"].numpy() & seen).any()


def test_evaluation_inputs_hold_training_items_only(fused_top):
    _, prepared, rec = fused_top
    split = prepared.split
    for u in split.evaluated_users:
        items, _ = rec.builder.user_histories([u])
        assert items[0].tolist() == split.history(u)[::-1][: rec.builder.max_history].tolist()
        assert split.val_item[u] not in items[0] and split.test_item[u] not in items[0]
        assert rec.builder.columns[split.test_item[u], u] == 0 and rec.builder.columns[split.val_item[u], u] == 0


# ---- artifact and API ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, frames, tiny_encoder):
    out = tmp_path_factory.mktemp("trained")
    cfg = config_from_dict({
        "output": str(out), "data": {"text_template": "{title}. {genres}", "max_length": 24},
        "model": {"variant": "fused", "text_model": tiny_encoder, "finetune": "top", "text_dim": 16, "fusion_dim": 16,
                  "dmf_user_layers": [16], "dmf_item_layers": [16]},
        "train": {"epochs": 1, "batch_size_per_worker": 64, "negatives_per_positive": 16}})
    rec, _ = run_local(cfg, prepare_data(cfg, frames), log=lambda s: None)
    return rec, out / "artifact"


def test_test_stage_scores_read_the_validation_item_as_a_served_fold_in(trained):
    """Leave-one-out: at test the model reads the training history + the validation item, through the same
    path as serving a known user with one new interaction (recommend(user_ids, histories))."""
    rec, _ = trained
    split = rec.builder.split
    users = split.evaluated_users[:4]
    at_test = rec.score_users(users, split.model_inputs(users, "test"))
    for row, u in enumerate(users):
        served = rec.recommend(user_ids=[rec.users.raw_ids[u]], histories=[[rec.items.raw_ids[split.val_item[u]]]],
                               k=5, exclude_seen=False)[0]
        top = torch.topk(at_test[row], 5)
        assert [r.item_id for r in served] == [rec.items.raw_ids[int(i)] for i in top.indices]
        assert not torch.allclose(at_test[row], rec.score_users(np.array([u]))[0])   # the new item changed it
    torch.testing.assert_close(rec.score_users(users, split.model_inputs(users, "val")), rec.score_users(users))
    with pytest.raises(ValueError, match="does not start with the training history"):
        rec.score_users(users[:1], [np.array([split.val_item[users[0]]])])


def test_text_prior_reaches_every_scoring_path_and_the_artifact(trained, tmp_path):
    """model.text_prior blends the same way for evaluation (score_users), a served fold-in (recommend) and a
    reloaded artifact; 0 leaves the model's scores untouched."""
    rec, _ = trained
    split = rec.builder.split
    users = split.evaluated_users[:4]
    inputs = split.model_inputs(users, "test")
    newest_first = [np.asarray(h)[::-1] for h in inputs]
    cap = rec.config.data.max_history
    # The prior's item side is planted (random unit vectors), where the two forms differ by a known amount: the
    # tiny random encoder's item vectors are close together (mean-pooled cosines 0.85-0.93 on the planted
    # titles; > 0.9999 while its tokenizer read every word as [UNK], before 9e6953a), so how far its forms differ
    # is not known in advance.
    planted = torch.nn.functional.normalize(torch.randn(split.n_items, 8, generator=torch.Generator().manual_seed(0)),
                                            dim=-1)
    by_form = {form: text_scores(planted, newest_first, cap, form) for form in ("mean", "max")}
    assert (by_form["mean"] - by_form["max"]).abs().max() > 0.5
    plain = rec.score_users(users, inputs)
    assert rec.config.model.text_prior == 0.0
    torch.testing.assert_close(plain, rec.score_users(users, inputs, text_prior=False))
    original, original_text = rec.config, rec.unit_item_text
    rec.unit_item_text = planted
    try:
        for form in ("mean", "max"):
            rec.config = original.replace(**{"model.text_prior": 1.0, "model.text_prior_items": 2.0,
                                             "model.text_prior_form": form})
            blended = rec.score_users(users, inputs)
            assert not torch.allclose(blended, plain)
            expected = blend(plain, text_scores(planted, newest_first, cap, form),
                             input_lengths(newest_first, cap), 1.0, 2.0)
            torch.testing.assert_close(blended, expected)         # the configured form, not the other one
            for row, u in enumerate(users):
                served = rec.recommend(user_ids=[rec.users.raw_ids[u]], k=5, exclude_seen=False,
                                       histories=[[rec.items.raw_ids[split.val_item[u]]]])[0]
                assert [r.item_id for r in served] == [rec.items.raw_ids[int(i)]
                                                       for i in torch.topk(blended[row], 5).indices]
            loaded = Recommender.load(rec.save(tmp_path / form))
            assert (loaded.config.model.text_prior, loaded.config.model.text_prior_items,
                    loaded.config.model.text_prior_form) == (1.0, 2.0, form)
            loaded.unit_item_text = planted
            torch.testing.assert_close(loaded.score_users(users, inputs), blended, atol=1e-4, rtol=1e-4)
    finally:
        rec.config, rec.unit_item_text = original, original_text


def test_choose_text_prior_sets_the_validation_choice_on_the_trained_model(frames, tiny_encoder, tmp_path):
    cfg = config_from_dict({
        "output": str(tmp_path), "data": {"text_template": "{title}. {genres}", "max_length": 24},
        "model": {"variant": "fused", "text_model": tiny_encoder, "finetune": "frozen", "text_dim": 16,
                  "fusion_dim": 16, "dmf_user_layers": [16], "dmf_item_layers": [16]},
        "train": {"epochs": 1, "batch_size_per_worker": 64, "negatives_per_positive": 16,
                  "choose_text_prior": True}})
    lines = []
    rec, summary = run_local(cfg, prepare_data(cfg, frames), log=lines.append)
    chosen = [line for line in lines if line.startswith("text prior chosen on validation")]
    assert len(chosen) == 1 and "0/0=" in chosen[0]
    weight = rec.config.model.text_prior
    assert f"text_prior={weight:g} " in chosen[0]
    assert Recommender.load(tmp_path / "artifact").config.model.text_prior == weight

def test_artifact_round_trip_scores_equal_and_no_pickles(trained):
    rec, path = trained
    loaded = Recommender.load(path)
    users = np.arange(5)
    assert torch.allclose(loaded.score_users(users), rec.score_users(users), atol=1e-5)
    assert torch.allclose(loaded.score_texts(["galaxy rocket"]), rec.score_texts(["galaxy rocket"]), atol=1e-5)
    suffixes = {p.suffix for p in path.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".parquet", ".txt"}, suffixes
    assert json.loads((path / "format.json").read_text())["version"] == 1


def test_replace_directory_keeps_a_whole_folder_at_every_step(tmp_path):
    """The exports (`save_artifact`, `raysparse train`'s <output>/artifact, a sweep's <output>/best) put a
    finished folder in place with `replace_directory`: the old one is renamed aside and deleted only after the
    new one is in place (issue 16: a kill during the old rmtree-then-rename left a half-deleted artifact)."""
    from raysparse.artifact import replace_directory

    def folder(name: str, text: str) -> Path:
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"f{i}").write_text(text)
        return tmp_path / name

    dest = folder("artifact", "v1")
    replace_directory(folder("artifact.tmp", "v2"), dest)
    assert {p.name: p.read_text() for p in dest.iterdir()} == {"f0": "v2", "f1": "v2", "f2": "v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    # What an export killed between its two renames leaves: the old folder aside, the new one at .tmp.
    dest.rename(tmp_path / "artifact.old")
    replace_directory(folder("artifact.tmp", "v3"), dest)      # the next export cleans it up
    assert (dest / "f0").read_text() == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    replace_directory(folder("new", "v4"), tmp_path / "fresh")  # nothing there before
    assert (tmp_path / "fresh" / "f2").read_text() == "v4"


def test_recommend_three_paths_exclude_seen_and_raw_ids(trained):
    rec, _ = trained
    known = rec.recommend(user_ids=["u001"], k=5)[0]
    seen = set(rec.items.to_raw(rec.builder.split.history(rec.users.to_idx(["u001"])[0])))
    assert len(known) == 5 and not seen & {r.item_id for r in known}
    fold_in = rec.recommend(histories=[["i001", "i005"]], k=5)[0]
    assert {"i001", "i005"}.isdisjoint({r.item_id for r in fold_in})
    assert [r.score for r in fold_in] == sorted([r.score for r in fold_in], reverse=True)
    text = rec.recommend(texts=["galaxy rocket orbit"], k=3)[0]
    assert len(text) == 3 and all(r.item_id in rec.items for r in text)
    # exclude_seen=False lets a seen item back in; exclude removes a named one.
    everything = rec.recommend(histories=[["i001"]], k=len(rec.items), exclude_seen=False)[0]
    assert "i001" in {r.item_id for r in everything}
    some = rec.recommend(histories=[["i001"]], k=5, exclude=[fold_in[0].item_id])[0]
    assert fold_in[0].item_id not in {r.item_id for r in some}


def test_a_user_described_only_by_text_gets_the_items_of_its_topic(tmp_path, frames, tiny_encoder):
    """Known answer: the planted items' titles carry their topic's words; after training the shipped design
    (history attention over item ids + frozen text, residual fusion), a text naming one topic's four words
    is a one-token user whose top 5 hold at least 4 of that topic's 10 items (chance: 1.25), for every topic.
    A model that could not read the words (every query the same token sequence) gets one list for all four."""
    from conftest import TOPIC_WORDS

    cfg = config_from_dict({
        "output": str(tmp_path), "data": {"text_template": "{title}. {genres}", "max_length": 24,
                                          "cohort_fraction": 0},
        "model": {"variant": "fused", "text_model": tiny_encoder, "finetune": "frozen",
                  "history_encoder": "attention", "fusion": "residual", "attention_dim": 32,
                  "attention_layers": 1, "attention_heads": 2, "residual_hidden_dim": 16,
                  "dmf_user_layers": [16], "dmf_item_layers": [16], "dropout": 0.0},
        "train": {"epochs": 20, "batch_size_per_worker": 32, "negatives_per_positive": 0, "lr": 0.01,
                  "example_mode": "sequence", "choose_text_prior": False}})
    rec, _ = run_local(cfg, prepare_data(cfg, frames), log=lambda s: None, save=False)
    topic_of = {row.item_id: int(row.genres.removeprefix("genre")) for row in frames[1].itertuples()}
    for topic, words in enumerate(TOPIC_WORDS):
        top = rec.recommend(texts=[" ".join(words)], k=5)[0]
        assert sum(topic_of[r.item_id] == topic for r in top) >= 4, (topic, [topic_of[r.item_id] for r in top])


def test_recommend_errors_say_what_to_send(trained):
    rec, path = trained
    with pytest.raises(UserError, match=r"k=0 must be an integer in \[1, 40\]"):
        rec.recommend(user_ids=["u001"], k=0)
    with pytest.raises(UnknownIdError, match="unknown user id.*'nobody'"):
        rec.recommend(user_ids=["nobody"])
    with pytest.raises(UnknownIdError, match=r"unknown item id.*\['zzz'\]") as err:
        rec.recommend(histories=[["i001", "zzz"]])
    assert err.value.unknown == ["zzz"]
    with pytest.raises(UserError, match="non-empty string"):
        rec.recommend(texts=["  "])
    with pytest.raises(UserError, match="history is empty"):
        rec.recommend(histories=[[]])
    with pytest.raises(UserError, match="not a raysparse artifact"):
        Recommender.load(path.parent)


NO_RAY = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "deepspeed"):
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
import raysparse
from raysparse import Recommender
from raysparse.http_api import RecommendRequest, ServedModel, plan_query, recommend_many
from raysparse.serve_config import load_serve_config
rec = Recommender.load(sys.argv[1])
print(rec.recommend(user_ids=["u001"], k=3)[0][0].item_id)
print(rec.recommend(texts=["galaxy"], k=3)[0][0].item_id)
# The HTTP API's request path (what the plain server and the Serve replica run) and its config are core too.
served = ServedModel.load(sys.argv[1])
query, _ = plan_query(served, RecommendRequest(user_id="u001", k=3))
expected = [r.item_id for r in rec.recommend(user_ids=["u001"], k=3)[0]]
assert [rec.items.raw_ids[i] for i, _ in recommend_many(served, [query])[0]] == expected
assert load_serve_config(sets=["serve.port=8001"]).port == 8001
# The training core: the epoch loop, the DeepSpeed config and engine (deepspeed only inside the functions
# that start an engine), the checks before a distributed run.
from raysparse.engine import DeepSpeedTraining, deepspeed_config
from raysparse.local import run_local
from raysparse.loop import train_epochs, train_local
from raysparse.preflight import check_static
assert deepspeed_config(rec.config, 2)["train_batch_size"] == 2 * rec.config.train.batch_size_per_worker
assert check_static(rec.config)["zero_optimization"]["stage"] == rec.config.ray.zero_stage
# The Ray Data path's per-block steps and its file listing are core too.
from raysparse.data.blocks import expand_examples, user_sequence
from raysparse.data.sources import choose_reader
assert choose_reader("") == "pandas"
# The sweep core: its config and search space.
from raysparse.sweep import check_tune, load_tune_config
config, tc = load_tune_config(sys.argv[2], ["tune.space.train.lr={uniform: [0.001, 0.01]}"])
lr = check_tune(config, tc)[-1]
assert (lr.key, lr.kind, lr.values) == ("train.lr", "uniform", (0.001, 0.01))
assert not any(m.split(".")[0] in ("ray", "deepspeed") for m in sys.modules)
print("ok")
"""


def test_core_api_works_without_ray_or_deepspeed(trained):
    """The Recommender, and the sweep's config and search-space checks (raysparse.sweep), with both blocked."""
    _, path = trained
    tune_yaml = Path(__file__).resolve().parents[1] / "configs" / "tune_tiny.yaml"
    proc = subprocess.run([sys.executable, "-c", NO_RAY, str(path), str(tune_yaml)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_short_history_augmentation_keeps_the_k_most_recent_items(fused_top):
    _, prepared, rec = fused_top
    builder = rec.builder
    builder.short_history_prob = 1.0
    try:
        users, targets, positions = builder.training_examples("prefix")
        histories, _ = builder.example_histories(users, positions, "prefix", np.random.default_rng(0))
    finally:
        builder.short_history_prob = 0.2
    for u, p, h in zip(users, positions, histories):
        newest_first = prepared.split.history(u)[:p][::-1]
        assert len(h) in {min(p, k) for k in (1, 2, 3, 5)}
        assert h.tolist() == newest_first[: len(h)].tolist()
    assert {len(h) for h, p in zip(histories, positions) if p >= 5} == {1, 2, 3, 5}
