"""Ray Serve around the HTTP API: replicas, batching across clients, deploy and hot swap.

    raysparse serve --artifact runs/demo/artifact            # http://127.0.0.1:8000/docs
    raysparse serve --artifact runs/v2/artifact --address auto   # on a running cluster: hot-swaps the model

The API itself (routes, request checks, scoring) is `raysparse.http_api`, which runs without Ray; this module
adds what Ray does, and imports Ray only inside the functions that call it:
  RecommenderDeployment  the Serve replica: loads the artifact once and batches requests across clients
                       with `@serve.batch` (text-encoder requests and user/history requests apart).
  build_serve_app / deploy  bind and run. Deploying another artifact on a running app is Serve's rolling
                       update with surge: new replicas load the new model and take traffic before the old
                       ones drain, so the swap fails no request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI

from raysparse.errors import UserError
from raysparse.http_api import (Query, QueryResult, ServedModel, artifact_token, build_fastapi_app, check_artifact,
                                recommend_many)
from raysparse.serve_config import ServeConfig

log = logging.getLogger("raysparse.serve")

DEPLOYMENT_NAME = "Recommender"


@functools.lru_cache(maxsize=None)
def deployment_class() -> Any:
    """The Serve deployment, defined on first use so that importing this module does not import Ray."""
    from ray import serve

    @serve.deployment(name=DEPLOYMENT_NAME)
    @serve.ingress()
    class RecommenderDeployment:
        """One replica: loads the artifact once (item vectors included) and batches requests across clients."""

        def __init__(self, artifact: str, config: dict) -> None:
            serve_config = ServeConfig(**config)
            torch.set_num_threads(serve_config.torch_threads)
            for batched, wait_s in ((self.recommend_texts, serve_config.text_batch_wait_timeout_s),
                                    (self.recommend_histories, serve_config.batch_wait_timeout_s)):
                batched.set_max_batch_size(serve_config.max_batch_size)
                batched.set_batch_wait_timeout_s(wait_s)
            self._served = ServedModel.load(artifact)
            self._batch_sizes: dict = collections.defaultdict(collections.Counter)
            log.info("serving %s (model_id %s)", artifact, self._served.model_id)

        def __serve_build_asgi_app__(self) -> FastAPI:
            return build_fastapi_app(lambda: self._served, self.run_query)

        def model_info(self) -> dict:
            """What /healthz shows, plus the batches run on this replica (kind -> {size: count})."""
            return {**self._served.describe(), "batches": {k: dict(v) for k, v in self._batch_sizes.items()}}

        async def run_query(self, query: Query) -> QueryResult:
            # Two queues: a warm batch (~1 ms a user) should not wait behind an encoder batch.
            if query.path == "text":
                return await self.recommend_texts(query)
            return await self.recommend_histories(query)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
        async def recommend_texts(self, queries: list[Query]) -> list[QueryResult]:
            return await self._run_batch("text", queries)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
        async def recommend_histories(self, queries: list[Query]) -> list[QueryResult]:
            return await self._run_batch("history", queries)

        async def _run_batch(self, kind: str, queries: list[Query]) -> list[QueryResult]:
            # In a worker thread, so the event loop keeps taking requests; they queue up as the next batch.
            self._batch_sizes[kind][len(queries)] += 1
            return await asyncio.to_thread(recommend_many, self._served, queries)

    return RecommenderDeployment


def build_serve_app(artifact: str | Path, config: ServeConfig) -> Any:
    """A Serve Application (not started) serving `artifact`."""
    artifact = check_artifact(artifact)
    scaling: dict = ({"autoscaling_config": {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                             "target_ongoing_requests": config.target_ongoing_requests}}
                     if config.autoscaling else {"num_replicas": config.num_replicas})
    deployment = deployment_class().options(
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
        max_ongoing_requests=config.max_ongoing_requests,
        # Hot swap = Serve's rolling update. With surge at 100% each new replica is started, has loaded the new
        # artifact and is taking traffic before an old one is told to stop; the old one finishes its in-flight
        # requests first. (At the default 0, Serve stops old replicas first: one replica means a gap.) The
        # price: the cluster needs room for twice the replicas while a swap runs.
        max_surge_percent=100,
        # A broken artifact fails fast instead of being retried 20 times; the old replicas keep serving.
        max_constructor_retry_count=2,
        **scaling)
    return deployment.bind(artifact, dataclasses.asdict(config))


def deploy(artifact: str | Path, config: ServeConfig) -> str:
    """Serve `artifact` on the connected Ray cluster and return the API's URL; blocks until it answers.

    Starts Serve's HTTP proxy on config.host:port unless Serve is running. On a running app of the same name
    this hot-swaps the model (a rolling update: new replicas up before old ones stop, no failed requests).
    """
    from ray import serve

    artifact = check_artifact(artifact)
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
