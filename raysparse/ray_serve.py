"""Ray Serve around the HTTP API: replicas, batching across clients, back-pressure, deploy and hot swap.

    raysparse serve --artifact runs/demo/artifact            # http://127.0.0.1:8000/docs
    raysparse serve --artifact runs/v2/artifact --address auto   # on a running cluster: hot-swaps the model

The API itself (routes, request checks, scoring) is `raysparse.http_api`, which runs without Ray; this module
adds what Ray does, and imports Ray only inside the functions that call it:
  RecommenderDeployment  the ingress replica: loads the artifact once (item vectors and known users' vectors
                       included), answers warm and fold-in requests itself, batched across clients with
                       `@serve.batch`, and hands text requests to:
  TextDeployment       the text encoder's own replicas (processes): an encoder batch (~10 ms a text) never holds
                       the ingress's loop or its GIL, so warm answers do not queue behind it; its queue is bounded
                       (serve.max_queued_texts) and a full queue is a 503 with Retry-After, not seconds of waiting.
  build_serve_app / deploy  bind and run. Deploying another artifact on a running app is Serve's rolling
                       update with surge: new replicas load the new model and take traffic before the old
                       ones drain, so the swap fails no request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from raysparse.errors import UserError
from raysparse.http_api import (ApiError, Query, QueryResult, ServedModel, artifact_token, build_fastapi_app,
                                check_artifact, recommend_many)
from raysparse.ray_train import cluster_capacity
from raysparse.serve_config import ServeConfig

log = logging.getLogger("raysparse.serve")

DEPLOYMENT_NAME = "Recommender"
TEXT_DEPLOYMENT_NAME = "RecommenderText"


@functools.lru_cache(maxsize=None)
def deployment_classes() -> tuple[Any, Any]:
    """(ingress, text) Serve deployments, defined on first use so that importing this module does not import Ray."""
    from ray import serve
    from ray.serve.exceptions import BackPressureError

    @serve.deployment(name=TEXT_DEPLOYMENT_NAME)
    class TextDeployment:
        """Text requests only: the encoder, batched across clients, in a process of its own."""

        def __init__(self, artifact: str, config: dict) -> None:
            serve_config = ServeConfig(**config)
            torch.set_num_threads(serve_config.torch_threads)
            self.recommend_texts.set_max_batch_size(serve_config.max_batch_size)
            self.recommend_texts.set_batch_wait_timeout_s(serve_config.text_batch_wait_timeout_s)
            self._served = ServedModel.load(artifact, cache_users=False,
                                            text_encoder_dtype=serve_config.text_encoder_dtype)
            self._batch_sizes: collections.Counter = collections.Counter()

        async def score(self, query: Query) -> tuple[str, QueryResult]:
            """(model_id, result): the caller checks that both replicas run the same model (see run_query)."""
            return self._served.model_id, await self.recommend_texts(query)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
        async def recommend_texts(self, queries: list[Query]) -> list[QueryResult]:
            self._batch_sizes[len(queries)] += 1
            # In a worker thread, so the loop keeps taking requests; they queue up as the next batch.
            return await asyncio.to_thread(recommend_many, self._served, queries)

        def batches(self) -> dict:
            return dict(self._batch_sizes)

    @serve.deployment(name=DEPLOYMENT_NAME)
    @serve.ingress()
    class RecommenderDeployment:
        """One ingress replica: the HTTP API; warm and fold-in batches here, text on `TextDeployment`."""

        def __init__(self, artifact: str, config: dict, text: Any = None) -> None:
            serve_config = ServeConfig(**config)
            torch.set_num_threads(serve_config.torch_threads)
            self.recommend_histories.set_max_batch_size(serve_config.max_batch_size)
            self.recommend_histories.set_batch_wait_timeout_s(serve_config.batch_wait_timeout_s)
            self._served = ServedModel.load(artifact, text_encoder_dtype=serve_config.text_encoder_dtype)
            self._text = text if self._served.has_text else None
            self._retry_after_s = serve_config.retry_after_s
            self._batch_sizes: dict = collections.defaultdict(collections.Counter)
            log.info("serving %s (model_id %s)", artifact, self._served.model_id)

        def __serve_build_asgi_app__(self) -> FastAPI:
            return build_fastapi_app(lambda: self._served, self.run_query)

        async def model_info(self) -> dict:
            """What /healthz shows, plus the batches run (kind -> {size: count}; text: on TextDeployment)."""
            batches = {k: dict(v) for k, v in self._batch_sizes.items()}
            if self._text is not None:
                batches["text"] = await self._text.batches.remote()
            return {**self._served.describe(), "batches": batches}

        async def run_query(self, query: Query) -> QueryResult:
            if query.path != "text":
                return await self.recommend_histories(query)
            try:
                model_id, result = await self._text.score.remote(query)
            except BackPressureError as err:
                raise ApiError(503, f"the text encoder is busy (serve.max_queued_texts text requests wait already); "
                                    f"retry in {self._retry_after_s} s, or send a user_id or history, which are "
                                    f"answered apart.", headers={"Retry-After": str(self._retry_after_s)}) from err
            if model_id != self._served.model_id:
                # Mid hot swap, a text replica of the other model answered: its item indices may not be ours.
                # Score here instead (slower, but right); this lasts only while both versions run.
                return (await asyncio.to_thread(recommend_many, self._served, [query]))[0]
            return result

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
        async def recommend_histories(self, queries: list[Query]) -> list[QueryResult]:
            # On the loop, not a thread: a warm query is ~0.2 ms (cached user vector), a fold-in ~0.5 ms, less than
            # a thread hand-off; requests arriving meanwhile queue up as the next batch.
            self._batch_sizes["history"][len(queries)] += 1
            return recommend_many(self._served, queries)

    return RecommenderDeployment, TextDeployment


def deployment_class() -> Any:
    """The ingress deployment (the one `serve.run` returns a handle to)."""
    return deployment_classes()[0]


def _has_text_tower(artifact: str) -> bool:
    """From the artifact's config.json, without loading the model."""
    from raysparse.config import config_from_dict

    return config_from_dict(json.loads((Path(artifact) / "config.json").read_text())).model.uses_text


def build_serve_app(artifact: str | Path, config: ServeConfig) -> Any:
    """A Serve Application (not started) serving `artifact`."""
    artifact = check_artifact(artifact)
    ingress, text = deployment_classes()
    scaling: dict = ({"autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                             "target_ongoing_requests": config.target_ongoing_requests}}
                     if config.autoscaling else {"num_replicas": config.num_replicas})
    common = dict(
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
        # Hot swap = Serve's rolling update. With surge at 100% each new replica is started, has loaded the new
        # artifact and is taking traffic before an old one is told to stop; the old one finishes its in-flight
        # requests first. (At the default 0, Serve stops old replicas first: one replica means a gap.) The
        # price: the cluster needs room for twice the replicas while a swap runs.
        max_surge_percent=100,
        # A broken artifact fails fast instead of being retried 20 times; the old replicas keep serving.
        max_constructor_retry_count=2,
        **scaling)
    text_app = None
    if _has_text_tower(artifact):
        text_app = text.options(
            # One batch encoding and one filling per replica; more waits at the ingress's handle, at most
            # max_queued_texts, then BackPressureError -> 503 + Retry-After (RecommenderDeployment.run_query).
            max_ongoing_requests=2 * config.max_batch_size,
            max_queued_requests=config.max_queued_texts or -1, **common).bind(artifact, dataclasses.asdict(config))
    deployment = ingress.options(
        max_ongoing_requests=config.max_ongoing_requests,
        # Serve's proxy holds at most this many requests for busy replicas, then answers 503 with Retry-After.
        max_queued_requests=config.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": config.retry_after_s},
        **common)
    return deployment.bind(artifact, dataclasses.asdict(config), text_app)


def deploy(artifact: str | Path, config: ServeConfig) -> str:
    """Serve `artifact` on the connected Ray cluster and return the API's URL; blocks until it answers.

    Starts Serve's HTTP proxy on config.host:port unless Serve is running. On a running app of the same name
    this hot-swaps the model (a rolling update: new replicas up before old ones stop, no failed requests).
    """
    from ray import serve

    artifact = check_artifact(artifact)
    config.check_capacity(cluster_capacity(), _has_text_tower(artifact))  # Serve would wait forever instead
    logging_config = {"enable_access_log": config.access_log}
    serve.start(http_options={"host": config.host, "port": config.port}, logging_config=logging_config)
    try:
        handle = serve.run(build_serve_app(artifact, config), name=config.app_name,
                           route_prefix=config.route_prefix, logging_config=logging_config)
    except RuntimeError as err:  # Serve's message ends with the replica's traceback; keep its first lines
        first = " ".join(str(err).strip().splitlines()[:3])
        raise UserError(f"deploying {artifact!r} failed: {first} ... Replicas of a previous deploy keep "
                        f"serving. See the replica logs (`serve status`, Ray's session logs) and fix the "
                        f"artifact or the --num-cpus-per-replica / --num-gpus-per-replica request.") from err
    info = handle.model_info.remote().result(timeout_s=60)
    expected = artifact_token(artifact)
    if info["model_id"] != expected:
        raise UserError(f"the app answers with model {info['model_id']}, not {expected} from {artifact!r}; was "
                        f"the artifact rewritten while deploying? Deploy it again.")
    return config.url()
