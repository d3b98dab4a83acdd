"""Ray Serve end to end: one Serve instance for the module, two tiny artifacts (the second for the hot swap).

Known answers: every response must equal `Recommender.load(dir).recommend(...)` for the same input (1e-5),
every bad input must come back as the 4xx that says what to send instead, and a redeploy under a client
loop must fail zero requests.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from conftest import free_port, make_artifact
from raysparse.errors import ConfigError
from raysparse.http_api import artifact_token
from raysparse.ray_serve import deploy
from raysparse.serve_config import ServeConfig

APP = "raysparse-test"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, frames, tiny_encoder) -> tuple[str, str]:
    return (make_artifact(tmp_path_factory, frames, tiny_encoder, seed=0),
            make_artifact(tmp_path_factory, frames, tiny_encoder, seed=1))


@pytest.fixture(scope="module")
def recommenders(artifacts):
    from raysparse.recommender import Recommender

    return tuple(Recommender.load(a) for a in artifacts)


@pytest.fixture(scope="module")
def server(artifacts):
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # 0.5 CPU per replica leaves room for the second replica of a rolling hot swap; a 50 ms batch window makes
    # concurrent text requests share a batch even on a busy machine.
    config = ServeConfig(port=free_port(), app_name=APP, num_cpus_per_replica=0.5, batch_wait_timeout_s=0.05,
                         text_batch_wait_timeout_s=0.05, access_log=False)
    try:
        url = deploy(artifacts[0], config)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield SimpleNamespace(url=url, config=config, http=http, serve=serve)
    finally:
        serve.shutdown()
        ray.shutdown()


def assert_same(items: list[dict], expected) -> None:
    assert [i["item_id"] for i in items] == [r.item_id for r in expected]
    np.testing.assert_allclose([i["score"] for i in items], [r.score for r in expected], rtol=0, atol=1e-5)


# ---- Ray-free: configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"port": 0}, r"serve.port=0 must be in \[1, 65535\]"),
    ({"port": "8000"}, r"serve.port='8000' has the wrong type: expected int \(flag --port\)"),
    ({"host": ""}, r"serve.host is empty; use --host 127.0.0.1"),
    ({"route_prefix": "api"}, r"must start with '/'; e.g. --route-prefix /recsys"),
    ({"num_replicas": 0}, r"serve.num_replicas=0 must be >= 1"),
    ({"min_replicas": 2}, r"needs autoscaling: also set --max-replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, r"1 <= serve.min_replicas <= serve.max_replicas"),
    ({"num_gpus_per_replica": -1.0}, r"num_gpus_per_replica=-1.0 must be >= 0 \(flag --num-gpus-per-replica\)"),
    ({"max_batch_size": 0}, r"max_batch_size=0 must be >= 1"),
    ({"max_batch_size": 128}, r"raise --max-ongoing-requests to at least 128"),
    ({"access_log": 1}, r"serve.access_log=1 has the wrong type: expected bool"),
    ({"max_queued_requests": 0}, r"serve.max_queued_requests=0 must be >= 1, or -1 for no limit"),
    ({"max_queued_texts": -1}, r"serve.max_queued_texts=-1 must be >= 0 \(0: no limit"),
    ({"retry_after_s": 0}, r"serve.retry_after_s=0 must be >= 1 \(flag --retry-after-s\)"),
])
def test_serve_config_errors_name_the_key_and_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**kwargs)


def test_capacity_check_counts_both_deployments_and_names_the_fix():
    """Known answers: 2 replicas x 1 CPU fit 2 CPUs without text and not with it (the text encoder is a second
    deployment of the same size: 4 CPUs); autoscaling counts min_replicas; GPUs are checked the same way."""
    ServeConfig(num_replicas=2).check_capacity({"CPU": 2.0}, with_text=False)
    with pytest.raises(ConfigError,
                       match=r"serving needs 4 CPUs .*the Ray cluster has 2\. Lower --num-cpus-per-replica"):
        ServeConfig(num_replicas=2).check_capacity({"CPU": 2.0}, with_text=True)
    ServeConfig(min_replicas=1, max_replicas=8).check_capacity({"CPU": 2.0}, with_text=True)
    with pytest.raises(ConfigError, match=r"serving needs 1 GPUs .*has 0\. Lower --num-gpus-per-replica"):
        ServeConfig(num_gpus_per_replica=1.0).check_capacity({"CPU": 8.0}, with_text=False)


def test_serve_config_defaults_bind_localhost():
    config = ServeConfig()
    assert config.host == "127.0.0.1" and config.url() == "http://127.0.0.1:8000"
    assert not config.autoscaling and ServeConfig(max_replicas=3).autoscaling


# ---- Serve end to end -----------------------------------------------------------------------------------------


@pytest.mark.ray
def test_healthz_docs_and_items(server, artifacts, recommenders):
    health = server.http.get("/healthz").json()
    assert health["status"] == "ok" and health["model_id"] == artifact_token(artifacts[0])
    assert health["items"] == 40 and health["text_tower"] is True
    assert server.http.get("/docs").status_code == 200
    assert "/recommend" in server.http.get("/openapi.json").json()["paths"]
    item = server.http.get("/items/i003").json()
    assert item["item_id"] == "i003" and item["title"] == recommenders[0].item_info("i003")["title"]


@pytest.mark.ray
@pytest.mark.parametrize("body, path, call", [
    ({"user_id": "u001", "k": 5}, "warm", {"user_ids": ["u001"], "k": 5}),
    ({"user_id": "u002", "k": 7, "exclude_seen": False}, "warm", {"user_ids": ["u002"], "k": 7, "exclude_seen": False}),
    ({"history": ["i001", "i005", "i009"], "k": 5}, "fold_in", {"histories": [["i001", "i005", "i009"]], "k": 5}),
    ({"user_id": "u003", "history": ["i002"], "exclude": ["i006"]}, "warm",
     {"user_ids": ["u003"], "histories": [["i002"]], "exclude": ["i006"]}),
    ({"text": "galaxy rocket orbit", "k": 5}, "text", {"texts": ["galaxy rocket orbit"], "k": 5}),
    ({"text": "dragon castle", "k": 3, "exclude": ["i001", "i005"]}, "text",
     {"texts": ["dragon castle"], "k": 3, "exclude": ["i001", "i005"]}),
])
def test_scores_equal_the_recommender(server, recommenders, body, path, call):
    response = server.http.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["path"] == path and data["notes"] == []
    assert_same(data["items"], recommenders[0].recommend(**call)[0])
    first = data["items"][0]
    info = recommenders[0].item_info(first["item_id"])
    assert first["title"] == info["title"] and first["text"] == info["text"]


@pytest.mark.ray
def test_unknown_user_with_history_folds_in_with_a_note(server, recommenders):
    data = server.http.post("/recommend", json={"user_id": "new-user", "history": ["i004", "i008"]}).json()
    assert data["path"] == "fold_in" and "not known at training" in data["notes"][0]
    assert_same(data["items"], recommenders[0].recommend(histories=[["i004", "i008"]])[0])


@pytest.mark.ray
def test_long_text_is_truncated_with_a_note(server, recommenders):
    text = "galaxy rocket alien orbit " * 20
    data = server.http.post("/recommend", json={"text": text, "k": 4}).json()
    assert data["path"] == "text"
    assert any("the model read the first 32 (data.max_length)" in note for note in data["notes"])
    assert_same(data["items"], recommenders[0].recommend(texts=[text], k=4)[0])


@pytest.mark.ray
def test_concurrent_requests_are_batched_and_exact(server, recommenders):
    """Requests of many clients share `recommend` calls (one per kind and exclude_seen) with different k and
    exclude lists; each answer still equals its own single `recommend` call."""
    words = ["galaxy", "dragon", "detective", "wedding", "rocket", "sword", "clue", "kiss"]
    cases = []
    for i in range(8):
        k, exclude = 2 + i % 4, [f"i{i:03d}"] if i % 2 else []
        cases.append(({"text": f"{words[i]} {words[(i * 3) % 8]}", "k": k, "exclude": exclude},
                      {"texts": [f"{words[i]} {words[(i * 3) % 8]}"], "k": k, "exclude": exclude}))
        cases.append(({"user_id": f"u{i:03d}", "k": k, "exclude": exclude},
                      {"user_ids": [f"u{i:03d}"], "k": k, "exclude": exclude}))
        cases.append(({"history": [f"i{i + 1:03d}", f"i{i + 5:03d}"], "k": k, "exclude": exclude},
                      {"histories": [[f"i{i + 1:03d}", f"i{i + 5:03d}"]], "k": k, "exclude": exclude}))
    barrier = threading.Barrier(len(cases))

    def ask(body):
        barrier.wait()
        return server.http.post("/recommend", json=body)

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(ask, [body for body, _ in cases]))
    for (body, call), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        assert_same(response.json()["items"], recommenders[0].recommend(**call)[0])
    batches = server.serve.get_app_handle(APP).model_info.remote().result(timeout_s=60)["batches"]
    assert max(batches["text"]) > 1 and max(batches["history"]) > 1, f"requests were never batched: {batches}"


BAD_INPUTS = [
    # (body or raw bytes, status, message the response must contain)
    ({"user_id": "u999"}, 404, r"user_id 'u999' is not a user known at training; send their history"),
    ({"history": ["i001", "nope", 77]}, 422, r"unknown item id\(s\) in history: \['nope', 77\]"),
    ({"user_id": "u001", "exclude": ["zzz"]}, 422, r"unknown item id\(s\) in exclude: \['zzz'\]"),
    ({"user_id": "u001", "k": 0}, 422, r"k=0 is invalid .*send an integer in \[1, 1000\]"),
    ({"user_id": "u001", "k": 1001}, 422, r"k=1001 is invalid .*send an integer in \[1, 1000\]"),
    ({"user_id": "u001", "k": "10"}, 422, r"k='10' is invalid .*valid integer"),
    ({"user_id": "u001", "k": 2.5}, 422, r"k=2.5 is invalid"),
    ({"user_id": "u001", "k": 500}, 422, r"k=500 is more than the 40 items in the catalogue; send k <= 40"),
    ({"text": ""}, 422, r"text is empty; send a non-empty description"),
    ({"text": "   "}, 422, r"text is empty; send a non-empty description"),
    ({"text": "x" * 20_001}, 422, r"send a non-empty string of at most 20000 characters"),
    ({"text": 42}, 422, r"text=42 is invalid .*valid string"),
    ({"text": "space", "user_id": "u001"}, 422, r"send text alone, or user_id and/or history"),
    ({"history": []}, 422, r"history is empty; send at least one item id"),
    ({"history": "i001"}, 422, r"history='i001' is invalid .*send a list of item ids"),
    ({"history": ["i001", 1.5]}, 422, r"history\[1\]=1.5 is invalid"),
    ({"user_id": True}, 422, r"user_id=True is invalid"),
    ({"user_id": "u001", "exclude_seen": "yes"}, 422, r"exclude_seen='yes' is invalid .*send true or false"),
    ({"user": "u001"}, 422, r"unknown field 'user'; send only user_id, history, text, k, exclude_seen, exclude"),
    ({}, 422, r"nothing to recommend for: send \"user_id\""),
    ([1, 2], 422, r"the body must be a JSON object, got a list"),
    (b'{"user_id": ', 422, r"the request body is not valid JSON \(.*\); send a JSON object such as"),
    (None, 422, r"the request needs a JSON object body"),
]


@pytest.mark.ray
@pytest.mark.parametrize("body, status, message", BAD_INPUTS)
def test_bad_input_is_a_4xx_that_says_what_to_send(server, body, status, message):
    if body is None:
        response = server.http.post("/recommend")
    elif isinstance(body, bytes):
        response = server.http.post("/recommend", content=body, headers={"content-type": "application/json"})
    else:
        response = server.http.post("/recommend", json=body)
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    assert re.search(message, response.json()["detail"]), response.json()["detail"]


@pytest.mark.ray
def test_bad_paths_are_4xx_too(server):
    response = server.http.get("/items/not-an-item")
    assert response.status_code == 404 and "not in the 40-item catalogue; ids look like 'i000'" in response.text
    response = server.http.get("/recommend")
    assert response.status_code == 405 and "the API has POST /recommend" in response.text
    response = server.http.post("/recommend", content=b'{"user_id": "u001"}', headers={"content-type": "text/plain"})
    assert response.status_code == 422 and "Content-Type: application/json" in response.json()["detail"]


@pytest.mark.ray
def test_hot_swap_fails_no_request(server, artifacts, recommenders):
    """Deploying artifact B on the running app while clients hammer it: zero errors, then B answers."""
    before, after = artifact_token(artifacts[0]), artifact_token(artifacts[1])
    bodies = [{"user_id": "u001"}, {"history": ["i001", "i005"]}, {"text": "galaxy rocket"}]
    errors: list = []
    seen: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                for body in bodies:
                    try:
                        response = http.post("/recommend", json=body)
                    except httpx.HTTPError as err:
                        errors.append(repr(err))
                        continue
                    if response.status_code != 200:
                        errors.append((response.status_code, response.text))
                    else:
                        seen.append(response.json()["model_id"])

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        while len(seen) < 10 and not errors:
            time.sleep(0.05)
        assert deploy(artifacts[1], server.config) == server.url
        deadline = time.monotonic() + 60
        while seen.count(after) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert seen[0] == before and seen.count(after) >= 10
    data = server.http.post("/recommend", json={"user_id": "u001", "k": 5}).json()
    assert data["model_id"] == after
    assert_same(data["items"], recommenders[1].recommend(user_ids=["u001"], k=5)[0])
