"""`raysparse bench serve`: where a request's time goes, and how the tail behaves under load.

Parts, each a table (all traffic to 127.0.0.1):
  0. profile       (opt-in) the plain app called in this process through ASGI, no sockets: p50 per path and a
                   cProfile of each path, to see what is not the model.
  1. server time   the plain app (`http_api.build_plain_app`, no Ray) at concurrency 1, per path (warm = a known
                   user, fold_in = a new user given items, text = a free text): p50/p99 of the time inside the
                   app (its Server-Timing header) beside the client's end-to-end time. Goals: warm p50 <= 0.5 ms,
                   fold-in <= 1 ms, text <= 8 ms (MiniLM).
  2. sweep         latency and QPS per path x concurrency, Ray Serve and the plain app measured in alternation,
                   cell by cell, so machine noise hits both alike; drawn as a latency-vs-concurrency chart (PNG).
  3. mixed         warm + fold-in + text at once through Ray Serve (concurrency 32): p50/p99 per path, errors and
                   503s (back-pressure). Goal: p99 <= 4 x p50 per path, zero errors.
  4. ingress       (--ingress default haproxy) Serve's Python proxy against its HAProxy ingress: warm QPS at
                   concurrency 32 and failed requests during a hot swap under load.
The default artifact (built once, reused): 10k synthetic items, 5k users, fused DMF + frozen MiniLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from raysparse.bench.common import print_table
from raysparse.serve_config import TEXT_ENCODER_DTYPES, ServeConfig

KINDS = ("warm", "fold_in", "text")
SERVER_TIME_GOALS_MS = {"warm": 0.5, "fold_in": 1.0, "text": 8.0}   # p50 server time, plain app, concurrency 1
TAIL_GOAL = 4.0                                                     # mixed load: p99 <= TAIL_GOAL x p50, per path
PARTS = ("profile", "server-time", "sweep", "mixed", "ingress")


def register_bench(subparsers) -> None:
    p = subparsers.add_parser("serve", help="Serve latency: server time per path, Ray Serve vs. plain uvicorn, "
                                            "mixed-load tail, proxy vs. HAProxy ingress.")
    p.add_argument("--artifact", default="", help="Artifact to serve; empty = build (or reuse) the 10k-item one "
                                                  "under --output.")
    p.add_argument("--output", default="runs/bench-serve", help="Where the built artifact and results go.")
    p.add_argument("--items", type=int, default=10_000, help="Items of the built artifact.")
    p.add_argument("--users", type=int, default=5_000, help="Users of the built artifact.")
    p.add_argument("--quick", action="store_true", help="Fewer requests and a shorter mixed run (a few minutes; "
                                                        "noisier numbers).")
    p.add_argument("--parts", nargs="+", default=["server-time", "sweep", "mixed"], choices=PARTS,
                   help="Which parts to run (ingress is opt-in: it starts Serve once per ingress).")
    p.add_argument("--requests", type=int, default=0, help="Requests per cell (default 400, --quick 100).")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="Sweep: clients in flight.")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="Request kinds (paths).")
    p.add_argument("--k", type=int, default=10, help="Items per answer.")
    p.add_argument("--mixed-seconds", type=float, default=0.0, help="Mixed part: seconds of load (default 60, "
                                                                    "--quick 20).")
    p.add_argument("--mixed-concurrency", type=int, default=32, help="Mixed part: clients in flight.")
    p.add_argument("--mix", type=float, nargs=3, default=[0.45, 0.45, 0.10], metavar=("WARM", "FOLD_IN", "TEXT"),
                   help="Mixed part: share of each path.")
    p.add_argument("--ingress", nargs="+", default=["default", "haproxy"], choices=["default", "haproxy"],
                   help="Ingress part: which Serve ingresses to compare.")
    p.add_argument("--serve-ingress", default="default", choices=["default", "haproxy"],
                   help="Sweep and mixed parts: Serve's Python proxy, or its HAProxy ingress.")
    defaults = ServeConfig()
    p.add_argument("--num-cpus-per-replica", type=float, default=defaults.num_cpus_per_replica,
                   help="Serve replica CPUs (= torch threads; the plain app gets the same thread count).")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    p.add_argument("--batch-wait-timeout-s", type=float, default=defaults.batch_wait_timeout_s,
                   help="user_id/history batches.")
    p.add_argument("--text-batch-wait-timeout-s", type=float, default=defaults.text_batch_wait_timeout_s,
                   help="text batches.")
    p.add_argument("--max-ongoing-requests", type=int, default=defaults.max_ongoing_requests)
    p.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests)
    p.add_argument("--max-queued-texts", type=int, default=defaults.max_queued_texts)
    p.add_argument("--text-encoder-dtype", default=defaults.text_encoder_dtype, choices=TEXT_ENCODER_DTYPES,
                   help="Text encoder weights in every server (auto: bfloat16 on a CPU with native bfloat16).")
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
    """n request bodies: random known users (warm), 5 random items as a new user's history (fold_in), or titles
    of two random items as a free text (text)."""
    import pandas as pd

    from raysparse.data.vocab import Vocab

    rng = random.Random(seed)
    if kind == "warm":
        users = Vocab.load(Path(artifact) / "users.json").raw_ids
        return [{"user_id": rng.choice(users), "k": k} for _ in range(n)]
    if kind == "fold_in":
        items = Vocab.load(Path(artifact) / "items.json").raw_ids
        return [{"history": rng.sample(items, 5), "k": k} for _ in range(n)]
    titles = pd.read_parquet(Path(artifact) / "items.parquet", columns=["title"])["title"].tolist()
    return [{"text": f"{rng.choice(titles)} and {rng.choice(titles)}", "k": k} for _ in range(n)]


def mixed_bodies(artifact: str, mix: list[float], n: int, k: int, seed: int = 1) -> list[tuple[str, dict]]:
    """n (kind, body) pairs, kinds drawn with the shares in `mix` (warm, fold_in, text), shuffled."""
    rng = random.Random(seed)
    kinds = rng.choices(KINDS, weights=mix, k=n)
    pools = {kind: iter(request_bodies(artifact, kind, kinds.count(kind), k, seed)) for kind in KINDS}
    return [(kind, next(pools[kind])) for kind in kinds]


async def load(url: str, bodies: list, concurrency: int, duration_s: float | None = None,
               stop: threading.Event | None = None) -> list[dict]:
    """POST bodies to url/recommend with `concurrency` clients in flight: each body once, or, with duration_s or
    stop, round and round until that many seconds passed or stop is set. `bodies` holds dicts or (kind, dict)
    pairs. One record per request: kind, status (0: no answer), e2e_ms (client), server_ms (Server-Timing),
    retry_after."""
    import httpx

    from raysparse.http_api import server_time_ms

    records: list[dict] = []
    pairs = [b if isinstance(b, tuple) else ("", b) for b in bodies]
    counter = iter(range(10**9))
    deadline = time.perf_counter() + duration_s if duration_s else None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        async def worker() -> None:
            while True:
                i = next(counter)
                if stop is not None:
                    if stop.is_set():
                        return
                elif deadline is None and i >= len(pairs) or deadline is not None and time.perf_counter() > deadline:
                    return
                kind, body = pairs[i % len(pairs)]
                t0 = time.perf_counter()
                record = {"kind": kind, "status": 0, "server_ms": None, "retry_after": None, "error": ""}
                try:
                    response = await http.post("/recommend", json=body)
                    record.update(status=response.status_code, server_ms=server_time_ms(response.headers),
                                  retry_after=response.headers.get("retry-after"))
                    if response.status_code != 200:
                        record["error"] = f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as err:
                    record["error"] = repr(err)
                record["e2e_ms"] = (time.perf_counter() - t0) * 1e3
                records.append(record)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    for r in records:
        r["wall_s"] = wall
    return records


def summarize_records(records: list[dict]) -> dict:
    """p50/p99 of end-to-end and server time over the answered (200) requests; QPS; errors; 503s."""
    ok = [r for r in records if r["status"] == 200]
    e2e = np.array([r["e2e_ms"] for r in ok]) if ok else np.zeros(1)
    server = np.array([r["server_ms"] for r in ok if r["server_ms"] is not None])
    rejected = [r for r in records if r["status"] == 503]
    errors = [r for r in records if r["status"] not in (200, 503)]
    wall = records[0]["wall_s"] if records else 1.0
    return {"requests": len(records), "errors": len(errors), "rejected_503": len(rejected),
            "p50_ms": float(np.percentile(e2e, 50)), "p99_ms": float(np.percentile(e2e, 99)),
            "server_p50_ms": float(np.percentile(server, 50)) if len(server) else None,
            "server_p99_ms": float(np.percentile(server, 99)) if len(server) else None,
            "qps": len(ok) / wall, "first_error": next((r["error"] for r in errors), ""),
            "retry_after": next((r["retry_after"] for r in rejected), None),
            "first_503": next((r["error"] for r in rejected), "")}


# ---- the servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 300) -> dict:
    """The server's /healthz answer, once it gives one."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the plain server exited with code {proc.returncode}")
        try:
            health = httpx.get(f"{url}/healthz", timeout=2)
            if health.status_code == 200:
                return health.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not healthy after {timeout_s:.0f}s")


def start_plain(artifact: str, port: int, threads: int, text_encoder_dtype: str = "auto") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "raysparse.cli", "serve", "--plain", "--artifact", artifact, "--port", str(port),
           "--num-cpus-per-replica", str(threads), "--no-access-log", "--text-encoder-dtype", text_encoder_dtype]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(port=free_port(), app_name="raysparse-bench", num_cpus_per_replica=args.num_cpus_per_replica,
                       max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                       text_batch_wait_timeout_s=args.text_batch_wait_timeout_s,
                       max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
                       max_queued_texts=args.max_queued_texts, access_log=False,
                       text_encoder_dtype=args.text_encoder_dtype)


def start_ray(args: argparse.Namespace, env: dict | None = None) -> None:
    """A local Ray instance; `env` is set in this process first, so Ray's processes (Serve's controller, proxy,
    replicas) inherit it (how RAY_SERVE_* switches reach them)."""
    import ray

    os.environ.update(env or {})
    # Logical CPUs for two deployments (ingress, text) twice over: a hot swap starts the new replicas first.
    ray.init(address="local", num_cpus=max(2, int(np.ceil(4 * args.num_cpus_per_replica))), include_dashboard=False,
             log_to_driver=False)


def stop_ray(env: dict | None = None) -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        for key in env or {}:
            os.environ.pop(key, None)


def haproxy_env() -> dict:
    """RAY_SERVE_ENABLE_HA_PROXY=1 with HAProxy's files and ports private to this run: their defaults
    (/tmp/haproxy-serve/..., stats port 8404, metrics port 9101) are shared by everyone on the machine. A short
    folder under /tmp: Serve adds a 56-character node id below it, and a unix socket path over 107 bytes stops
    HAProxy ("'stats socket' : socket path ... too long"; seen with a folder under runs/)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rs-hap-"))
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


# ---- the parts -----------------------------------------------------------------------------------------------


def part_server_time(plain_url: str, artifact: str, args: argparse.Namespace, n: int) -> list[dict]:
    """Part 1: the plain app at concurrency 1, per path: server time and end-to-end time."""
    rows = []
    for kind in args.kinds:
        bodies = request_bodies(artifact, kind, n if kind != "text" else max(50, n // 2), args.k, seed=3)
        asyncio.run(load(plain_url, bodies[:20], 1))  # warm-up: the first calls of each shape are slow
        row = {"path": kind, **summarize_records(asyncio.run(load(plain_url, bodies, 1)))}
        goal = SERVER_TIME_GOALS_MS[kind]
        row["goal_ms"] = goal
        row["met"] = "yes" if row["server_p50_ms"] is not None and row["server_p50_ms"] <= goal else "no"
        rows.append(row)
        print(f"  server time {kind}: p50 {row['server_p50_ms']:.3f} ms (goal {goal}), end to end "
              f"{row['p50_ms']:.2f} ms", flush=True)
    return rows


def part_sweep(targets: dict, artifact: str, args: argparse.Namespace, n: int) -> list[dict]:
    """Part 2: per path x concurrency x target, alternating targets cell by cell."""
    rows = []
    for kind in args.kinds:
        bodies = request_bodies(artifact, kind, n if kind != "text" else max(50, n // 2), args.k)
        for url in targets.values():
            asyncio.run(load(url, bodies[:20], 4))
        for concurrency in args.concurrency:
            for target, url in targets.items():
                row = {"path": kind, "concurrency": concurrency, "target": target,
                       **summarize_records(asyncio.run(load(url, bodies, concurrency)))}
                rows.append(row)
                print(f"  {kind} c={concurrency} {target}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                      f"{row['qps']:.0f} qps, {row['errors']} errors", flush=True)
    return rows


def part_mixed(url: str, artifact: str, args: argparse.Namespace, seconds: float) -> list[dict]:
    """Part 3: warm + fold-in + text at once through Serve, per path p50/p99, errors, 503s."""
    bodies = mixed_bodies(artifact, args.mix, 3000, args.k)
    asyncio.run(load(url, bodies[:60], 8))
    records = asyncio.run(load(url, bodies, args.mixed_concurrency, duration_s=seconds))
    rows = []
    for kind in (*KINDS, "all"):
        mine = [r for r in records if kind == "all" or r["kind"] == kind]
        if not mine:
            continue
        row = {"path": kind, **summarize_records(mine)}
        row["p99/p50"] = row["p99_ms"] / row["p50_ms"]
        row["met"] = "yes" if row["p99/p50"] <= TAIL_GOAL and row["errors"] == 0 else "no"
        rows.append(row)
    return rows


def part_ingress(artifact: str, args: argparse.Namespace, n: int, output: Path) -> list[dict]:
    """Part 4: per ingress, a fresh Ray + Serve: warm QPS at concurrency 32, then a hot swap (deploying a copy
    of the artifact, which has another model_id) under a mixed client loop, counting failed requests."""
    from raysparse.ray_serve import deploy

    swap_artifact = output / "swap-artifact"
    if not (swap_artifact / "format.json").exists():
        shutil.copytree(artifact, swap_artifact, dirs_exist_ok=True)
    rows = []
    for ingress in args.ingress:
        env = haproxy_env() if ingress == "haproxy" else {}
        config = serve_config(args)
        row: dict = {"ingress": ingress, "load_avg": os.getloadavg()[0]}
        try:
            start_ray(args, env)
            t0 = time.perf_counter()
            url = deploy(artifact, config)
            row["deploy_s"] = time.perf_counter() - t0
            bodies = request_bodies(artifact, "warm", n, args.k)
            asyncio.run(load(url, bodies[:40], 8))
            warm = summarize_records(asyncio.run(load(url, bodies, 32)))
            row.update(warm_qps_c32=warm["qps"], warm_p50_ms=warm["p50_ms"], warm_p99_ms=warm["p99_ms"],
                       warm_errors=warm["errors"] + warm["rejected_503"])
            row.update(hot_swap(url, artifact, str(swap_artifact), config, args))
        except Exception as err:  # noqa: BLE001 - reported in the table: why this ingress could not be measured
            lines = [line for line in str(err).splitlines() if "Error" in line or "ALERT" in line]
            row["failed"] = f"{type(err).__name__}: {' '.join(' '.join(lines[-3:]).split())[-400:]}"
            print(f"  ingress {ingress}: {row['failed']}", flush=True)
        finally:
            stop_ray(env)
        rows.append(row)
        print(f"  ingress {ingress}: {row}", flush=True)
    return rows


def hot_swap(url: str, artifact: str, swap_artifact: str, config: ServeConfig, args: argparse.Namespace) -> dict:
    """Deploy swap_artifact over the running app while a mixed client loop runs; failed requests and model ids."""
    from raysparse.http_api import artifact_token
    from raysparse.ray_serve import deploy

    import httpx

    bodies = mixed_bodies(artifact, args.mix, 2000, args.k, seed=5)
    result: dict = {}
    stop = threading.Event()
    thread = threading.Thread(target=lambda: result.update(records=asyncio.run(load(url, bodies, 8, stop=stop))))
    thread.start()
    try:
        time.sleep(2)
        t0 = time.perf_counter()
        deploy(swap_artifact, config)
        swap_s = time.perf_counter() - t0
        new_id, deadline = artifact_token(swap_artifact), time.monotonic() + 60
        while time.monotonic() < deadline:  # until every answer comes from the new model
            if all(httpx.get(f"{url}/healthz", timeout=10).json().get("model_id") == new_id for _ in range(5)):
                break
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        thread.join()
    records = result["records"]
    failed = [r for r in records if r["status"] != 200]
    deploy(artifact, config)  # back to the first artifact, for the next ingress
    return {"swap_s": swap_s, "swap_requests": len(records), "swap_failed": len(failed),
            "swap_first_failure": failed[0]["error"] if failed else ""}


def part_profile(artifact: str, args: argparse.Namespace, n: int, out: Path) -> list[dict]:
    """Part 0: the plain app in this process, called through ASGI with no socket and no other thread (text's
    encoder thread aside), per path: p50 of the whole app call, then a cProfile of the same calls written to
    <output>/profile_<path>.txt (sorted by own time). What is left there that is not the model is what to cut."""
    import cProfile
    import io
    import pstats

    import torch

    from raysparse.http_api import ServedModel, build_fastapi_app

    torch.set_num_threads(ServeConfig(num_cpus_per_replica=args.num_cpus_per_replica).torch_threads)
    served = ServedModel.load(artifact, text_encoder_dtype=args.text_encoder_dtype)
    app = build_fastapi_app(lambda: served)

    async def call(body: dict) -> None:
        raw = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/recommend", "raw_path": b"/recommend", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(raw)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        messages = [{"type": "http.request", "body": raw, "more_body": False}]
        status = []

        async def receive() -> dict:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        assert status == [200], f"{body} -> {status}"

    async def calls(bodies: list[dict]) -> list[float]:
        times = []
        for body in bodies:
            t0 = time.perf_counter()
            await call(body)
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    rows = []
    for kind in args.kinds:
        bodies = request_bodies(artifact, kind, n if kind != "text" else max(50, n // 2), args.k, seed=7)
        asyncio.run(calls(bodies[:20]))
        ms = np.array(asyncio.run(calls(bodies)))
        profile = cProfile.Profile()
        profile.enable()
        asyncio.run(calls(bodies))
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        (out / f"profile_{kind}.txt").write_text(text.getvalue())
        rows.append({"path": kind, "requests": len(bodies), "app_p50_ms": float(np.percentile(ms, 50)),
                     "app_p99_ms": float(np.percentile(ms, 99)), "profile": str(out / f"profile_{kind}.txt")})
        print(f"  in-process app call {kind}: p50 {rows[-1]['app_p50_ms']:.3f} ms", flush=True)
    return rows


# ---- the chart ------------------------------------------------------------------------------------------------


def write_chart(rows: list[dict], path: Path) -> Path | None:
    """Latency (p50 solid, p99 dashed) vs concurrency, one panel per path, one colour per target."""
    try:
        import matplotlib  # optional and heavy: only this chart needs it (pip install -e '.[bench]')
    except ImportError:
        print("matplotlib is not installed, so no chart; install it with pip install -e '.[bench]'.")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(r["path"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for target, colour in (("serve", "tab:blue"), ("plain", "tab:orange")):
            mine = sorted((r for r in rows if r["path"] == kind and r["target"] == target),
                          key=lambda r: r["concurrency"])
            if not mine:
                continue
            x = [r["concurrency"] for r in mine]
            ax.plot(x, [r["p50_ms"] for r in mine], "-o", color=colour, label=f"{target} p50")
            ax.plot(x, [r["p99_ms"] for r in mine], "--o", color=colour, label=f"{target} p99")
        ax.set(title=kind, xlabel="concurrency (clients in flight)", ylabel="end-to-end latency (ms)",
               xscale="log", yscale="log")
        ax.set_xticks(sorted({r["concurrency"] for r in rows}), labels=[str(c) for c in
                                                                        sorted({r["concurrency"] for r in rows})])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- the command ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    artifact = args.artifact or build_artifact(args.output, args.items, args.users)
    n = args.requests or (100 if args.quick else 400)
    mixed_s = args.mixed_seconds or (20.0 if args.quick else 60.0)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"artifact": artifact, "load_average_start": os.getloadavg(), "argv": sys.argv[1:]}
    print(f"artifact {artifact}; load average {os.getloadavg()[0]:.2f}", flush=True)
    threads = ServeConfig(num_cpus_per_replica=args.num_cpus_per_replica).torch_threads
    needs_plain = "server-time" in args.parts or "sweep" in args.parts
    needs_serve = "sweep" in args.parts or "mixed" in args.parts
    plain = None
    plain_url = f"http://127.0.0.1:{free_port()}"
    if "profile" in args.parts:
        results["profile_load_average_start"] = os.getloadavg()
        results["profile"] = part_profile(artifact, args, n, out)
        results["profile_load_average_end"] = os.getloadavg()
    try:
        if needs_plain:
            plain = start_plain(artifact, int(plain_url.rsplit(":", 1)[1]), threads, args.text_encoder_dtype)
            results["text_encoder_dtype"] = wait_healthy(plain_url, plain).get("text_encoder_dtype")
            print(f"plain server: text encoder in {results['text_encoder_dtype']}", flush=True)
        if "server-time" in args.parts:
            results["server_time_load_average_start"] = os.getloadavg()
            results["server_time"] = part_server_time(plain_url, artifact, args, n)
            results["server_time_load_average_end"] = os.getloadavg()
        if needs_serve:
            from raysparse.ray_serve import deploy

            serve_env = haproxy_env() if args.serve_ingress == "haproxy" else {}
            start_ray(args, serve_env)
            try:
                config = serve_config(args)
                serve_url = deploy(artifact, config)
                if "sweep" in args.parts:
                    results["sweep"] = part_sweep({"serve": serve_url, "plain": plain_url}, artifact, args, n)
                if "mixed" in args.parts:
                    if plain is not None:  # the plain server idles, but keep the machine to Serve alone
                        plain.terminate()
                        plain.wait(timeout=30)
                        plain = None
                    results["mixed_load_average_start"] = os.getloadavg()
                    results["mixed"] = part_mixed(serve_url, artifact, args, mixed_s)
                    results["mixed_load_average_end"] = os.getloadavg()
                    results["mixed_config"] = {k: getattr(config, k) for k in (
                        "max_ongoing_requests", "max_queued_requests", "max_queued_texts", "max_batch_size",
                        "batch_wait_timeout_s", "text_batch_wait_timeout_s", "num_cpus_per_replica")}
                from ray import serve

                results["batches"] = serve.get_app_handle(config.app_name).model_info.remote().result(
                    timeout_s=60)["batches"]
            finally:
                stop_ray(serve_env)
    finally:
        if plain is not None:
            plain.terminate()
            plain.wait(timeout=30)
    if "ingress" in args.parts:
        results["ingress"] = part_ingress(artifact, args, n, out)
    results["load_average_end"] = os.getloadavg()
    report(results, out)
    (out / "serve_bench.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


def args_ingress(results: dict) -> str:
    argv = results["argv"]
    chosen = argv[argv.index("--serve-ingress") + 1] if "--serve-ingress" in argv else "default"
    return "the HAProxy" if chosen == "haproxy" else "the default (Python proxy)"


def report(results: dict, out: Path) -> None:
    la = results["load_average_start"], results["load_average_end"]
    print(f"\nload average (1 min) at start {la[0][0]:.2f}, at end {la[1][0]:.2f}")
    if "profile" in results:
        la = results["profile_load_average_start"][0], results["profile_load_average_end"][0]
        print(f"\n0. The plain app called in-process through ASGI, no sockets (ms; load average {la[0]:.1f} -> "
              f"{la[1]:.1f}); cProfile of each path in the file named")
        print_table(results["profile"], ["path", "requests", "app_p50_ms", "app_p99_ms", "profile"])
    if "server_time" in results:
        la = results["server_time_load_average_start"][0], results["server_time_load_average_end"][0]
        print(f"\n1. Server time, plain app, concurrency 1 (time inside the app / end to end, ms; load average "
              f"{la[0]:.1f} -> {la[1]:.1f})")
        print_table(results["server_time"], ["path", "requests", "errors", "server_p50_ms", "server_p99_ms", "p50_ms",
                                             "p99_ms", "goal_ms", "met"])
    if "sweep" in results:
        print("\n2. Sweep: Ray Serve vs. plain app (end-to-end ms; server = time inside the app)")
        print_table(results["sweep"], ["path", "concurrency", "target", "requests", "errors", "p50_ms", "p99_ms",
                                       "server_p50_ms", "qps"])
        chart = write_chart(results["sweep"], out / "serve_latency.png")
        if chart:
            print(f"chart: {chart}")
    if "mixed" in results:
        la = results["mixed_load_average_start"][0], results["mixed_load_average_end"][0]
        print(f"\n3. Mixed load through Ray Serve, {args_ingress(results)} ingress ({results['mixed_config']}; load "
              f"average {la[0]:.1f} -> {la[1]:.1f}); goal p99 <= {TAIL_GOAL:g} x p50, 0 errors")
        print_table(results["mixed"], ["path", "requests", "errors", "rejected_503", "p50_ms", "p99_ms", "p99/p50",
                                       "server_p50_ms", "server_p99_ms", "qps", "met"])
        for row in results["mixed"]:
            if row["first_error"]:
                print(f"first error ({row['path']}): {row['first_error']}")
            if row["rejected_503"] and row["path"] != "all":
                print(f"first 503 ({row['path']}, Retry-After: {row['retry_after']}): {row['first_503']}")
    if "batches" in results:
        for kind, counts in results["batches"].items():
            sizes = {int(k): v for k, v in counts.items()}
            mean = sum(k * v for k, v in sizes.items()) / sum(sizes.values())
            print(f"{kind} batches on the replica: {sum(sizes.values())}, mean size {mean:.1f}, max {max(sizes)}")
    if "ingress" in results:
        print("\n4. Ingress: Serve's proxy vs. HAProxy (warm at concurrency 32; hot swap under a mixed loop)")
        print_table(results["ingress"], ["ingress", "load_avg", "deploy_s", "warm_qps_c32", "warm_p50_ms", "warm_p99_ms",
                                         "warm_errors", "swap_s", "swap_requests", "swap_failed", "failed"])
        for row in results["ingress"]:
            if row.get("swap_first_failure"):
                print(f"first failure during the swap ({row['ingress']}): {row['swap_first_failure']}")
