"""`raysparse bench serve`: p50/p99 latency and QPS of the Ray Serve app against the same `Recommender` behind a
plain uvicorn/FastAPI app (`http_api.build_plain_app`: the same routes, no batching), side by side in one run.

Both servers run at once on 127.0.0.1 and are measured in alternation, cell by cell (request kind x
concurrency), so machine noise hits both alike; compare the ratios, not the absolute numbers. Goals:
Serve's QPS >= the plain app's at concurrency 32 (batching pays), warm top-10 over 10k items p50 <= 10 ms,
zero errors. The default artifact (built once, reused): 10k synthetic items, fused DMF + frozen MiniLM, one
short epoch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from raysparse.bench.common import print_table
from raysparse.serve_config import ServeConfig

KINDS = ("warm", "text")


def register_bench(subparsers) -> None:
    p = subparsers.add_parser("serve", help="Serve latency/QPS: Ray Serve vs. plain uvicorn, same Recommender.")
    p.add_argument("--artifact", default="", help="Artifact to serve; empty = build (or reuse) the 10k-item one "
                                                  "under --output.")
    p.add_argument("--output", default="runs/bench-serve", help="Where the built artifact and results go.")
    p.add_argument("--items", type=int, default=10_000, help="Items of the built artifact.")
    p.add_argument("--users", type=int, default=5_000, help="Users of the built artifact.")
    p.add_argument("--quick", action="store_true", help="Few requests per cell (a smoke run, noisier numbers).")
    p.add_argument("--requests", type=int, default=0, help="Requests per cell (default 400, --quick 60).")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="Clients in flight.")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="Request kinds.")
    p.add_argument("--k", type=int, default=10, help="Items per answer.")
    defaults = ServeConfig()
    p.add_argument("--num-cpus-per-replica", type=float, default=defaults.num_cpus_per_replica,
                   help="Serve replica CPUs (= torch threads; the plain app gets the same thread count).")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--batch-wait-timeout-s", type=float, default=defaults.batch_wait_timeout_s,
                   help="user_id/history batches.")
    p.add_argument("--text-batch-wait-timeout-s", type=float, default=defaults.text_batch_wait_timeout_s,
                   help="text batches.")
    p.set_defaults(func=run)


# ---- the artifact ---------------------------------------------------------------------------------------------


def build_artifact(output: str, n_items: int, n_users: int) -> str:
    """10k synthetic items, fused DMF + frozen packaged MiniLM, one short epoch; reused when present."""
    from raysparse.config import config_from_dict
    from raysparse.local import run_local

    out = Path(output) / f"model-{n_items}i-{n_users}u"
    if (out / "artifact" / "format.json").exists():
        return str(out / "artifact")
    config = config_from_dict({
        "output": str(out),
        "data": {"synthetic_items": n_items, "synthetic_users": n_users, "text_template": "{title}. {genres}",
                 "max_length": 64},
        "model": {"variant": "fused", "finetune": "frozen", "text_dim": 64, "fusion_dim": 64,
                  "dmf_user_layers": [128, 64], "dmf_item_layers": [128, 64]},
        "train": {"epochs": 1, "max_steps_per_epoch": 30, "batch_size_per_worker": 256, "eval_batch_size": 512}})
    print(f"building the benchmark artifact in {out} (once) ...", flush=True)
    run_local(config, log=lambda line: print(f"  {line}", flush=True))
    return str(out / "artifact")


# ---- load generation --------------------------------------------------------------------------------------------


def request_bodies(artifact: str, kind: str, n: int, k: int, seed: int = 0) -> list[dict]:
    """n request bodies: random known users (warm), or titles of random items as free texts (text)."""
    import pandas as pd

    from raysparse.data.vocab import Vocab

    rng = random.Random(seed)
    if kind == "warm":
        users = Vocab.load(Path(artifact) / "users.json").raw_ids
        return [{"user_id": rng.choice(users), "k": k} for _ in range(n)]
    titles = pd.read_parquet(Path(artifact) / "items.parquet", columns=["title"])["title"].tolist()
    return [{"text": f"{rng.choice(titles)} and {rng.choice(titles)}", "k": k} for _ in range(n)]


async def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """POST every body to url/recommend with `concurrency` clients in flight; latency percentiles and QPS."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        async def worker() -> None:
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                try:
                    response = await http.post("/recommend", json=body)
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as err:
                    errors.append(repr(err))
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"requests": len(bodies), "errors": len(errors), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "qps": len(bodies) / wall, "first_error": errors[:1]}


# ---- the two servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the plain server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not healthy after {timeout_s:.0f}s")


def start_plain(artifact: str, port: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "raysparse.cli", "serve", "--plain", "--artifact", artifact, "--port", str(port),
           "--num-cpus-per-replica", str(threads), "--no-access-log"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> int:
    import ray

    from raysparse.ray_serve import deploy

    artifact = args.artifact or build_artifact(args.output, args.items, args.users)
    n_requests = args.requests or (60 if args.quick else 400)
    config = ServeConfig(port=free_port(), app_name="raysparse-bench", num_cpus_per_replica=args.num_cpus_per_replica,
                         max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                         text_batch_wait_timeout_s=args.text_batch_wait_timeout_s,
                         max_ongoing_requests=max(64, 2 * max(args.concurrency)), access_log=False)
    plain_url = f"http://127.0.0.1:{free_port()}"
    plain = start_plain(artifact, int(plain_url.rsplit(":", 1)[1]), config.torch_threads)
    ray.init(address="local", num_cpus=max(2, int(np.ceil(args.num_cpus_per_replica))), include_dashboard=False,
             log_to_driver=False)
    rows: list[dict] = []
    try:
        from ray import serve

        targets = {"serve": deploy(artifact, config), "plain": plain_url}
        wait_healthy(plain_url, plain)
        info = json.loads(_get(f"{targets['serve']}/healthz"))
        print(f"artifact {artifact}: {info['items']} items, {info['users']} users; {n_requests} requests per cell",
              flush=True)
        for kind in args.kinds:
            bodies = request_bodies(artifact, kind, n_requests, args.k)
            for url in targets.values():  # warm-up: first calls of each shape are slow
                asyncio.run(load(url, bodies[:20], 4))
            for concurrency in args.concurrency:
                for target, url in targets.items():
                    result = asyncio.run(load(url, bodies, concurrency))
                    rows.append({"kind": kind, "concurrency": concurrency, "target": target, **result})
                    print(f"  {kind} c={concurrency} {target}: p50 {result['p50_ms']:.1f} ms, "
                          f"{result['qps']:.0f} qps, {result['errors']} errors", flush=True)
        batches = serve.get_app_handle(config.app_name).model_info.remote().result(timeout_s=60)["batches"]
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
            plain.terminate()
            plain.wait(timeout=30)
    print()
    print_table([{k: v for k, v in r.items() if k != "first_error"} for r in rows],
                ["kind", "concurrency", "target", "requests", "errors", "p50_ms", "p99_ms", "qps"])
    summary = summarize(rows, info["items"], batches)
    for line in summary["lines"]:
        print(line)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps({"artifact": artifact, "rows": rows, **summary}, indent=2))
    return 0


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


def summarize(rows: list[dict], n_items: int, batches: dict) -> dict:
    cell = {(r["kind"], r["concurrency"], r["target"]): r for r in rows}
    lines, ratios = [], {}
    top = max(r["concurrency"] for r in rows)
    for kind in sorted({r["kind"] for r in rows}):
        serve_row, plain_row = cell.get((kind, top, "serve")), cell.get((kind, top, "plain"))
        if serve_row and plain_row:
            ratios[kind] = serve_row["qps"] / plain_row["qps"]
            lines.append(f"{kind}: Serve/plain QPS at concurrency {top} = {ratios[kind]:.2f} (goal >= 1)")
    warm = cell.get(("warm", 1, "serve"))
    if warm:
        lines.append(f"warm top-10 over {n_items} items, Serve, concurrency 1: p50 {warm['p50_ms']:.1f} ms "
                     f"(goal <= 10 ms)")
    errors = sum(r["errors"] for r in rows)
    lines.append(f"errors: {errors} (goal 0)" + (f"; first: {next(r['first_error'] for r in rows if r['errors'])}"
                                               if errors else ""))
    for kind, counts in batches.items():
        sizes = {int(k): v for k, v in counts.items()}
        mean = sum(k * v for k, v in sizes.items()) / sum(sizes.values())
        lines.append(f"{kind} batches on the replica: {sum(sizes.values())}, mean size {mean:.1f}, max {max(sizes)}")
    return {"lines": lines, "qps_ratio_at_max_concurrency": ratios, "errors": errors, "batches": batches}
