"""The Python client and `raysparse query`, against the same FastAPI app served without Ray (uvicorn in a
thread), plus the `serve` command's argument handling. No Ray here: these run in the fast default suite."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import free_port, make_artifact
from raysparse.cli import build_parser, main
from raysparse.client import ClientError, RecommenderClient, RequestRejected, ServerUnreachable
from raysparse.http_api import (Query, RecommendRequest, ServedModel, artifact_token, build_fastapi_app,
                                build_plain_app, plan_query, recommend_many)
from raysparse.errors import ConfigError
from raysparse.serve_config import ServeConfig, load_serve_config, serve_config_from_args


class PlainServer:
    """`build_plain_app(artifact)` under uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, artifact: str):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_plain_app(artifact), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "PlainServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, frames, tiny_encoder) -> str:
    return make_artifact(tmp_path_factory, frames, tiny_encoder, seed=0)


@pytest.fixture(scope="module")
def rec(artifact):
    from raysparse.recommender import Recommender

    return Recommender.load(artifact)


@pytest.fixture(scope="module")
def url(artifact):
    with PlainServer(artifact) as server:
        yield server.url


@pytest.fixture()
def client(url):
    with RecommenderClient(url) as c:
        yield c


def assert_same(result, expected) -> None:
    assert result.item_ids == [r.item_id for r in expected]
    np.testing.assert_allclose([i.score for i in result.items], [r.score for r in expected], rtol=0, atol=1e-5)


# ---- the Python client ------------------------------------------------------------------------------------------


def test_client_paths_match_the_recommender(client, rec, artifact):
    warm = client.recommend(user_id="u001", k=5)
    assert warm.path == "warm" and warm.model_id == artifact_token(artifact)
    assert_same(warm, rec.recommend(user_ids=["u001"], k=5)[0])
    assert warm.items[0].title == rec.item_info(warm.items[0].item_id)["title"]
    fold_in = client.recommend(history=("i001", "i005"), exclude=["i009"])
    assert fold_in.path == "fold_in"
    assert_same(fold_in, rec.recommend(histories=[["i001", "i005"]], exclude=["i009"])[0])
    text = client.recommend(text="wizard castle", k=3, exclude_seen=False)
    assert text.path == "text" and text.notes == []
    assert_same(text, rec.recommend(texts=["wizard castle"], k=3)[0])


def test_client_item_and_health(client, rec):
    assert client.item("i007")["title"] == rec.item_info("i007")["title"]
    health = client.health()
    assert health["status"] == "ok" and health["items"] == 40 and health["users"] == 120


def test_client_raises_the_servers_message(client):
    with pytest.raises(RequestRejected, match=r"server answered 404: user_id 'nobody' is not a user known") as err:
        client.recommend(user_id="nobody")
    assert err.value.status == 404 and err.value.unknown == ["nobody"]
    with pytest.raises(RequestRejected, match=r"422: unknown item id\(s\) in history: \['x1', 'x2'\]") as err:
        client.recommend(history=["i001", "x1", "x2"])
    assert err.value.unknown == ["x1", "x2"]
    with pytest.raises(RequestRejected, match=r"404: item_id 'zz' is not in the 40-item catalogue"):
        client.item("zz")
    with pytest.raises(ClientError, match=r"history='i001' must be a list of item ids"):
        client.recommend(history="i001")


def test_client_says_when_no_server_answers():
    with RecommenderClient(f"http://127.0.0.1:{free_port()}", timeout_s=5) as c:
        with pytest.raises(ServerUnreachable, match=r"is the server running\? Start it with `raysparse serve"):
            c.health()
    with pytest.raises(ClientError, match=r"must start with http:// or https://"):
        RecommenderClient("127.0.0.1:8000")


# ---- ids: raw -> index once (planning), index -> raw once (the response) ------------------------------------


def test_a_request_converts_ids_once_and_answers_as_before(artifact, rec, monkeypatch):
    """plan_query turns the request's raw ids into indices; scoring and the response look no id up again
    (every vocabulary lookup raises below), and the answers equal the raw-id Python API's to the bit."""
    from fastapi.testclient import TestClient

    served = ServedModel.load(artifact)
    item, user = (lambda i: int(rec.items.to_idx([i])[0])), (lambda u: int(rec.users.to_idx([u])[0]))
    query, notes = plan_query(served, RecommendRequest(user_id="u003", history=["i002", "i010"], exclude=["i006"],
                                                       k=5))
    assert notes == [] and query == Query("warm", k=5, exclude=(item("i006"),), user_idx=user("u003"),
                                          history=(item("i002"), item("i010")))
    other, _ = plan_query(served, RecommendRequest(user_id="u001", k=3))

    def looked_up(*_: object) -> None:
        raise AssertionError("an id was converted again after planning")

    for vocab in (served.rec.users, served.rec.items):
        for name in ("lookup", "to_idx", "to_raw"):
            monkeypatch.setattr(vocab, name, looked_up)
    expected = rec.recommend(user_ids=["u003"], histories=[["i002", "i010"]], exclude=["i006"], k=5)[0]
    [alone] = recommend_many(served, [query])
    assert [(served.rec.items.raw_ids[i], score) for i, score in alone] == [(r.item_id, r.score) for r in expected]
    batched = recommend_many(served, [query, other])[0]  # one matmul for both users: float32 rounding may differ
    assert [served.rec.items.raw_ids[i] for i, _ in batched] == [r.item_id for r in expected]
    np.testing.assert_allclose([score for _, score in batched], [r.score for r in expected], rtol=0, atol=1e-6)
    http = TestClient(build_fastapi_app(lambda: served))
    data = http.post("/recommend", json={"user_id": "u001", "k": 5}).json()
    assert data["path"] == "warm"
    assert [(i["item_id"], i["score"]) for i in data["items"]] == \
        [(r.item_id, r.score) for r in rec.recommend(user_ids=["u001"], k=5)[0]]
    assert http.get("/items/i007").json()["title"] == rec.item_info("i007")["title"]


# ---- raysparse query -------------------------------------------------------------------------------------------


def test_query_prints_a_table_and_json(url, rec, capsys):
    assert main(["query", "--url", url, "--user-id", "u001", "-k", "3"]) == 0
    out = capsys.readouterr().out
    expected = rec.recommend(user_ids=["u001"], k=3)[0]
    assert out.startswith("path=warm model=") and all(r.item_id in out for r in expected)
    assert main(["query", "--url", url, "--history", "i001", "i005", "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["path"] == "fold_in" and [i["item_id"] for i in data["items"]] == \
        [r.item_id for r in rec.recommend(histories=[["i001", "i005"]], k=2)[0]]
    assert main(["query", "--url", url, "--health"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    assert main(["query", "--url", url, "--item", "i002"]) == 0
    assert json.loads(capsys.readouterr().out)["item_id"] == "i002"


def test_query_errors_are_one_line(url, capsys):
    assert main(["query", "--url", url, "--user-id", "nobody"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: server answered 404: user_id 'nobody'") and err.count("\n") == 1
    assert main(["query", "--url", url, "--text", "x", "--item", "i001"]) == 2
    assert "send one of: --user-id and/or --history, --text, --item or --health" in capsys.readouterr().err
    assert main(["query", "--url", url, "--text", "space", "-k", "0"]) == 2
    assert "k=0 is invalid" in capsys.readouterr().err


# ---- raysparse serve: arguments ---------------------------------------------------------------------------------


def test_serve_flags_map_onto_serve_config():
    args = build_parser().parse_args([
        "serve", "--artifact", "x", "--port", "9123", "--min-replicas", "1", "--max-replicas", "3",
        "--num-cpus-per-replica", "2", "--num-gpus-per-replica", "0.5", "--max-batch-size", "32",
        "--batch-wait-timeout-s", "0.01", "--no-access-log"])
    config = serve_config_from_args(args)
    assert config == ServeConfig(port=9123, min_replicas=1, max_replicas=3, num_cpus_per_replica=2.0,
                                 num_gpus_per_replica=0.5, max_batch_size=32, batch_wait_timeout_s=0.01,
                                 access_log=False)
    assert config.host == "127.0.0.1" and config.autoscaling and config.torch_threads == 2


def test_serve_reads_a_yaml_serve_section_and_set_like_train(tmp_path):
    """One mechanism for every key: the file's serve: section, then --set serve.KEY=VALUE, then the key's flag."""
    path = tmp_path / "serve.yaml"
    path.write_text("model: {fusion_dim: 64}\n"      # a run's sections may stand beside serve:
                    "serve: {port: 9001, max_batch_size: 16, host: 0.0.0.0, access_log: false}\n")
    args = build_parser().parse_args(["serve", "--artifact", "x", "--config", str(path),
                                      "--set", "serve.max_batch_size=8", "--set", "serve.app_name=on",
                                      "--set", "serve.port=9002", "--port", "9003"])
    assert serve_config_from_args(args) == ServeConfig(port=9003, max_batch_size=8, host="0.0.0.0", app_name="on",
                                                       access_log=False)
    assert load_serve_config(path) == ServeConfig(port=9001, max_batch_size=16, host="0.0.0.0", access_log=False)
    assert load_serve_config(sets=["serve.batch_wait_timeout_s=1e-3", "serve.access_log=no"]) == \
        ServeConfig(batch_wait_timeout_s=0.001, access_log=False)


@pytest.mark.parametrize("sets, text, message", [
    (["serve.max_k=5"], None, r"Unknown config key 'serve.max_k'. Did you mean max_replicas, max_ongoing_requests, "
                              r"max_batch_size, max_queued_requests, max_queued_texts\? Known keys of 'serve': host, "
                              r"port, "),
    (["model.fusion_dim=64"], None, r"--set 'model.fusion_dim=64' must look like serve.KEY=VALUE, e.g. "
                                    r"serve.port=8001"),
    (["serve.port"], None, r"must look like serve.KEY=VALUE"),
    (["serve.port=abc"], None, r"serve.port='abc' has the wrong type: expected int. Example: --set serve.port=3"),
    ([], "serve: {prot: 8001}", r"Unknown config key 'serve.prot'.* Known keys of 'serve': host, port"),
    ([], "serv: {port: 8001}", r"Unknown top-level key\(s\) \['serv'\] in config file .*serve keys go under `serve:`"),
    ([], "model: {fusion_dim: 64}", r"has no `serve:` section; put the serve keys under it"),
    ([], "serve: {max_batch_size: 128}", r"raise --max-ongoing-requests to at least 128"),
])
def test_serve_file_and_set_errors_name_the_key_and_the_fix(tmp_path, sets, text, message):
    path = None
    if text is not None:
        path = tmp_path / "serve.yaml"
        path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_serve_config(path, sets)


def test_serve_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--config FILE" in shown and "--set serve.KEY=VALUE" in shown
    for f in dataclasses.fields(ServeConfig):
        assert f"(serve.{f.name}; default: {f.default})" in shown


def test_serve_rejects_bad_flags_before_starting_anything(tmp_path, capsys):
    assert main(["serve", "--artifact", str(tmp_path), "--max-batch-size", "100"]) == 2
    assert "raise --max-ongoing-requests to at least 100" in capsys.readouterr().err
    assert main(["serve", "--artifact", str(tmp_path)]) == 2
    assert "is not a raysparse artifact (no format.json)" in capsys.readouterr().err
    assert main(["serve", "--artifact", str(tmp_path), "--set", "serve.max_k=5"]) == 2
    assert "error: Unknown config key 'serve.max_k'." in capsys.readouterr().err


# ---- the HTTP layer needs no Ray ----------------------------------------------------------------------------


def test_http_layer_and_client_import_without_ray(artifact):
    """Block `ray` and serve one request through the plain app: the API runs where Ray is not installed."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, Block())
from fastapi.testclient import TestClient
from raysparse.http_api import build_plain_app
import raysparse.client, raysparse.extra_cli, raysparse.ray_serve
response = TestClient(build_plain_app({artifact!r})).post("/recommend", json={{"user_id": "u001", "k": 2}})
assert response.status_code == 200, response.text
assert not any(m.split(".")[0] == "ray" for m in sys.modules)
print(response.json()["path"])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "warm"


def test_text_on_a_model_without_text_tower_is_a_422(tmp_path_factory, frames, tiny_encoder):
    from fastapi.testclient import TestClient

    dmf = make_artifact(tmp_path_factory, frames, tiny_encoder, seed=0, variant="dmf")
    http = TestClient(build_plain_app(dmf))
    response = http.post("/recommend", json={"text": "galaxy"})
    assert response.status_code == 422
    assert "this model has no text tower (model.variant='dmf'); send a user_id or a history" in response.text
    assert http.post("/recommend", json={"user_id": "u001"}).json()["path"] == "warm"
