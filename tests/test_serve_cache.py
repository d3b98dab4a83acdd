"""The serving fast path, without Ray: cached user vectors, the pre-encoded response, the Server-Timing header.

Known answers: a cached warm answer equals the uncached computation to the bit, for every user; after the weights
change (what a hot swap or a retrain does to a loaded model) `refresh()` makes the cache answer as the new model
does; the response written from pre-encoded items equals FastAPI's encoding of the pydantic model.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_artifact
from raysparse.http_api import (Query, RecommendResponse, ServedModel, build_fastapi_app, recommend_many,
                                server_time_ms)
from raysparse.recommender import Recommender


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, frames, tiny_encoder) -> tuple[str, str]:
    return (make_artifact(tmp_path_factory, frames, tiny_encoder, seed=0),
            make_artifact(tmp_path_factory, frames, tiny_encoder, seed=1))


def all_warm_answers(rec: Recommender, k: int, exclude_seen: bool = True) -> list:
    return [rec.top_k(user_idx=[u], k=k, exclude_seen=exclude_seen)[0] for u in range(len(rec.users))]


@pytest.mark.parametrize("text_prior,form", [(0.0, "mean"), (1.0, "mean"), (1.0, "max")])
def test_cached_warm_answers_equal_the_uncached_ones_to_the_bit(artifacts, text_prior, form):
    uncached, cached = Recommender.load(artifacts[0]), Recommender.load(artifacts[0])
    for rec in (uncached, cached):
        rec.config = rec.config.replace(**{"model.text_prior": text_prior, "model.text_prior_items": 2.0,
                                           "model.text_prior_form": form})
    cached.cache_known_users()
    assert uncached.user_cache is None and cached.user_cache.vectors.shape == (120, cached.item_vectors.shape[1])
    # The 'max' form's user side is the history itself: nothing to cache beside the user vectors.
    assert (cached.user_cache.texts is not None) == (text_prior > 0 and form == "mean")
    assert cached._cached([0])
    for k, exclude_seen in ((5, True), (40, False)):
        assert all_warm_answers(cached, k, exclude_seen) == all_warm_answers(uncached, k, exclude_seen)
    # Paths the cache does not cover still give the uncached answers: new interactions, exclusions.
    assert cached.top_k(user_idx=[3], histories=[[2, 10]], k=5) == uncached.top_k(user_idx=[3], histories=[[2, 10]], k=5)
    assert cached.top_k(user_idx=[3], k=5, exclude=[6]) == uncached.top_k(user_idx=[3], k=5, exclude=[6])


def test_a_text_prior_switched_on_after_caching_is_not_answered_from_the_cache(artifacts):
    uncached, cached = Recommender.load(artifacts[0]), Recommender.load(artifacts[0])
    cached.config = cached.config.replace(**{"model.text_prior": 0.0})
    cached.cache_known_users()
    for rec in (uncached, cached):
        rec.config = rec.config.replace(**{"model.text_prior": 2.0, "model.text_prior_items": 0.0})
    assert all_warm_answers(cached, 5) == all_warm_answers(uncached, 5)


def test_refresh_after_new_weights_recomputes_the_cache(artifacts):
    """A swapped-in model answers as itself: before refresh() the cache still holds A's users, after it B's."""
    a, b = Recommender.load(artifacts[0]), Recommender.load(artifacts[1])
    a.cache_known_users()
    answers_a, answers_b = all_warm_answers(a, 5), all_warm_answers(b, 5)
    assert answers_a != answers_b  # two seeds: different models, or the check below would prove nothing
    a.model.load_state_dict(b.model.state_dict())
    a.refresh()
    assert all_warm_answers(a, 5) == answers_b


def test_served_model_caches_at_load_and_answers_as_the_recommender(artifacts):
    served, rec = ServedModel.load(artifacts[0]), Recommender.load(artifacts[0])
    assert served.rec.user_cache is not None
    query = Query("warm", k=5, user_idx=7)
    assert recommend_many(served, [query]) == rec.top_k(user_idx=[7], k=5)


@pytest.mark.parametrize("body", [
    {"user_id": "u001", "k": 5},
    {"history": ["i001", "i005"], "exclude": ["i009"]},
    {"user_id": "new-user", "history": ["i004"], "k": 3},     # a note
    {"text": "wizard castle", "k": 4, "exclude_seen": False},
])
def test_the_response_equals_fastapis_encoding_and_carries_server_timing(artifacts, body):
    from fastapi.testclient import TestClient

    from raysparse.http_api import RecommendRequest, plan_query

    served = ServedModel.load(artifacts[0])
    http = TestClient(build_fastapi_app(lambda: served))
    response = http.post("/recommend", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    query, notes = plan_query(served, RecommendRequest(**body))
    [ranked] = recommend_many(served, [query])
    raw_ids = served.rec.items.raw_ids
    expected = RecommendResponse(path=query.path, model_id=served.model_id, notes=notes, items=[
        {"item_id": raw_ids[i], "score": score, "title": served.titles[i], "text": served.texts[i]}
        for i, score in ranked])
    assert json.loads(response.content) == json.loads(expected.model_dump_json())
    assert response.json()["items"][0]["score"] == ranked[0][1]  # the same float, not a rounded one
    assert server_time_ms(response.headers) > 0
    assert server_time_ms(http.get("/items/i001").headers) > 0
    assert server_time_ms({"server-timing": "db;dur=3, app;dur=0.25"}) == 0.25 and server_time_ms({}) is None


def test_item_json_escapes_like_json():
    from raysparse.http_api import _item_json

    [(head, tail)] = _item_json([7], ['say "hi"\n'], ["été"])
    assert json.loads(head + "1.5" + tail) == {"item_id": 7, "score": 1.5, "title": 'say "hi"\n', "text": "été"}
    [(head, tail)] = _item_json([torch.tensor(3)], None, None)
    assert json.loads(head + "0.0" + tail) == {"item_id": 3, "score": 0.0, "title": None, "text": None}


def test_a_back_pressure_error_carries_retry_after():
    from raysparse.http_api import ApiError

    response = ApiError(503, "the text encoder is busy; retry in 2 s", headers={"Retry-After": "2"}).response()
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert json.loads(response.body) == {"detail": "the text encoder is busy; retry in 2 s"}


# ---- the text encoder's dtype (ServeConfig.text_encoder_dtype) ----------------------------------------------

def test_cpu_has_native_bf16_reads_the_cpu_flags():
    from raysparse.recommender import cpu_has_native_bf16

    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse\n")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_tile amx_bf16\n")
    assert not cpu_has_native_bf16("flags\t\t: fpu avx2 avx512f avx512bw\n")   # bf16 emulated: slower
    assert not cpu_has_native_bf16("")


def test_bfloat16_text_encoder_answers_like_float32(artifacts):
    full, half = Recommender.load(artifacts[0]), Recommender.load(artifacts[0])
    assert full.set_text_encoder_dtype("float32") == torch.float32
    assert half.set_text_encoder_dtype("bfloat16") == torch.bfloat16
    assert next(half.model.text.encoder.parameters()).dtype == torch.bfloat16
    texts = ["space opera", "a quiet drama about family", "comedy"]
    emb32 = full.encode_query_texts(texts)
    emb16 = half.encode_query_texts(texts)
    assert emb16.dtype == torch.float32                    # what reads it (the projection) stays float32
    assert torch.nn.functional.cosine_similarity(emb16, emb32).min() > 0.999
    # Every path still answers (this fine-tuned test model reads history text through the encoder too).
    for kwargs in ({"texts": texts}, {"histories": [[0, 1]]}, {"user_idx": [0]}):
        assert len(half.top_k(k=5, **kwargs)[0]) == 5


def test_auto_text_encoder_dtype_is_bfloat16_only_for_a_frozen_encoder_on_a_bf16_cpu(artifacts, monkeypatch):
    import raysparse.recommender as recommender_module
    from raysparse.errors import UserError

    rec = Recommender.load(artifacts[0])
    assert rec.model.text.finetune == "top"              # fine-tuned: fold-in reads the encoder, keep float32
    monkeypatch.setattr(recommender_module, "cpu_has_native_bf16", lambda: True)
    assert rec.set_text_encoder_dtype("auto") == torch.float32
    rec.model.text.finetune = "frozen"                   # frozen: only free-text queries read it
    assert rec.set_text_encoder_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(recommender_module, "cpu_has_native_bf16", lambda: False)
    assert rec.set_text_encoder_dtype("auto") == torch.float32
    with pytest.raises(UserError, match="'float16' is not one of auto, float32, bfloat16"):
        rec.set_text_encoder_dtype("float16")


def test_served_model_reports_its_text_encoder_dtype(artifacts):
    from raysparse.errors import ConfigError
    from raysparse.serve_config import ServeConfig

    served = ServedModel.load(artifacts[0], warm_up=False, cache_users=False, text_encoder_dtype="bfloat16")
    assert served.describe()["text_encoder_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="--text-encoder-dtype"):
        ServeConfig(text_encoder_dtype="fp16")
