"""End to end through the Ray Jobs API: a local head on 127.0.0.1 (`ray start --head`), `ray job submit`
of jobs/train.py with the tiny config, wait for SUCCEEDED, load the artifact and recommend, stop the head.

Token authentication stays on (Ray 2.60's default): the CLI client needs RAY_AUTH_MODE=token (see
RAY_NOTES.md). The head and the client read a token this test writes to its own temp dir (RAY_AUTH_TOKEN_PATH):
`ray start` creates none when ~/.ray/auth_token is missing, as on a fresh CI machine, and refuses to start. The head runs in its own process group with `--block`, so
teardown stops exactly this head (never `ray stop`, which would stop every Ray instance on the machine).
Its own temp dir keeps its address file away from other Ray instances; every port is a free one.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ray  # about a minute here; shares no Ray instance with other modules


def _free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _env(dashboard_port: int, token_path: Path) -> dict:
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):   # this head only, and the token below only
        env.pop(name, None)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path), RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}")
    return env


@pytest.fixture(scope="module")
def head():
    import ray

    if ray.is_initialized():  # one Ray per test process at a time; this module talks to its own head only
        ray.shutdown()
    (gcs, dashboard, client, agent_http, agent_grpc, runtime_env, metrics) = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rsj", dir="/tmp")            # short: Ray's socket paths are limited
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))                       # the form `ray get-auth-token --generate` writes
    token_path.chmod(0o600)
    env = dict(_env(dashboard, token_path), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # teardown: no 30 s drain
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", "--num-cpus=2",
         "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:       # answered (401 without a token): the job API is up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield {"dashboard": dashboard, "env": env}
    finally:
        proc.send_signal(signal.SIGTERM)         # `ray start --block` drains, then stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def test_submitted_training_job_succeeds_and_its_artifact_recommends(head, tmp_path, frames, tiny_encoder):
    from raysparse.recommender import Recommender

    data = tmp_path / "data"
    data.mkdir()
    frames[0].to_parquet(data / "interactions.parquet")
    frames[1].to_parquet(data / "items.parquet")
    out = tmp_path / "out"
    job_id = f"raysparse_test_{os.getpid()}"
    ray_cli = str(BIN / "ray")
    submit = subprocess.run(
        [ray_cli, "job", "submit", "--no-wait", f"--submission-id={job_id}", "--working-dir", str(ROOT), "--",
         "python", "jobs/train.py", "--config", "configs/tiny.yaml", "--output", str(out),
         "--set", f"data.path={data}", "--set", f"model.text_model={tiny_encoder}", "--set", "ray.num_workers=1"],
        env=head["env"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]

    status = ""
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        proc = subprocess.run([ray_cli, "job", "status", job_id], env=head["env"], capture_output=True, text=True,
                              timeout=60)
        text = proc.stdout + proc.stderr
        # The CLI says "Job '<id>' succeeded" / "failed" / "was stopped"; otherwise "Status ...: RUNNING".
        status = next((s.upper() for s in ("succeeded", "failed", "stopped") if f"' {s}" in text
                       or f"was {s}" in text), "")
        if status:
            break
        time.sleep(3)
    logs = subprocess.run([ray_cli, "job", "logs", job_id], env=head["env"], capture_output=True, text=True,
                          timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert '"best_epoch"' in logs

    summary = json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    rec = Recommender.load(out / "artifact")
    recs = rec.recommend(user_ids=["u001"], k=3)[0]
    assert len(recs) == 3
    history = rec.items.to_raw(rec.builder.split.history(int(rec.users.to_idx(["u001"])[0])))
    assert history and not {r.item_id for r in recs} & set(history)      # seen items are excluded
    assert {r.item_id for r in recs} <= set(frames[1].item_id)
