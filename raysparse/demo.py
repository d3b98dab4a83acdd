"""`raysparse demo`: the whole path on the embedded default, in a few minutes on 2 cores.

synthetic data -> Ray Train + DeepSpeed on local Ray (2 workers) -> a 2-trial Ray Tune sweep -> Ray Serve
hosts the best artifact -> three queries over HTTP (a known user, a new user by history, a new user by
text) -> shutdown. `--local` trains in this process instead and queries the Python API.

The console tells the story (each stage, its metrics, the three answers); Ray's own output goes to files:
Ray's driver-side loggers to <out>/ray-driver.log (`keep_ray_logs_in`), workers, actors, Ray Data and Serve to
the Ray session's log folder, both named at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path

from raysparse.client import RecommenderClient
from raysparse.config import load_config
from raysparse.local import epoch_line, run_local
from raysparse.recommender import Recommender
from raysparse.serve_config import ServeConfig
from raysparse.sweep import tune_config_from_dict

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_TEXT = "a starship crew explores a distant galaxy and a comet"
RAY_DRIVER_LOG = "ray-driver.log"
# Ray's driver-side loggers: "ray" (core, and ray.train / ray.tune, which pass their records up to it), and
# the two that Ray Data and Serve configure with console handlers of their own.
RAY_LOGGERS = ("ray", "ray.data", "ray.serve")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Synthetic data -> train -> tune -> serve -> three queries.")
    p.add_argument("--out", default="runs/demo", help="Output directory.")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="Config YAML (default: configs/demo.yaml).")
    p.add_argument("--local", action="store_true", help="Train in this process and query the Python API.")
    p.add_argument("--trials", type=int, default=2, help="Tune trials.")
    p.set_defaults(func=run)


def _queries(users: list, items: list) -> list[tuple[str, dict]]:
    return [(f"known user {users[0]!r}", {"user_id": users[0]}),
            (f"new user with history {items[:2]}", {"history": items[:2]}),
            (f"new user described as {DEMO_TEXT!r}", {"text": DEMO_TEXT})]


def print_queries(rec) -> None:
    """The three serving paths through the Python API."""
    for title, q in _queries(rec.users.raw_ids, rec.items.raw_ids):
        kwargs = {"user_ids": [q["user_id"]]} if "user_id" in q else \
            {"histories": [q["history"]]} if "history" in q else {"texts": [q["text"]]}
        print(f"\n== {title}")
        for r in rec.recommend(k=5, **kwargs)[0]:
            print(f"  {str(r.item_id):>10}  {r.score:8.3f}  {rec.item_info(r.item_id).get('text', '')[:70]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_ray_logs_in(path: Path) -> Path:
    """Ray's driver-side Python loggers write to `path` instead of the console: their console handlers are
    removed and one file handler takes their place (Ray Data also keeps writing its own ray-data.log in the
    session's log folder). Call after `import ray.data` and `ray.serve`, which add their handlers on import."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)          # Ray Data's logger passes DEBUG records; its ray-data.log keeps them
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- "
                                           "%(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    return path


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, [f"output={Path(args.out).resolve()}"])
    if args.local:
        rec, summary = run_local(config)
        print(json.dumps({k: round(v, 4) for k, v in summary["test"].items()
                          if k.endswith("ndcg@10") and "sampled" not in k}, indent=2))
        print_queries(rec)
        return 0
    return run_on_ray(config, args.trials)


def run_on_ray(config, trials: int) -> int:
    # Ray and the Ray shells are imported here, not at the top: `raysparse demo --local` (and every other
    # command, which imports this module to register it) runs without Ray.
    # Read when Tune and the Hugging Face libraries are first imported (below): Tune's older output engine
    # prints nothing at verbose=0 (the newer one still prints its configuration table), and the encoder's
    # weight-loading progress bar is not part of the story. A value set by the user wins.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import ray
    import ray.data  # noqa: F401  (imported before keep_ray_logs_in: it adds its console handler on import)
    from ray import serve  # noqa: F401  (the same)

    from raysparse.ray_serve import deploy
    from raysparse.ray_train import run_ray_training
    from raysparse.ray_tune import run_tune

    # Workers' output (log_to_driver=False) stays in the session's log files, Ray's driver-side logging in
    # ray-driver.log; this process prints the story: each stage, its metrics, the three answers.
    driver_log = keep_ray_logs_in(Path(config.output) / RAY_DRIVER_LOG)
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    logs = Path(context.address_info["session_dir"]) / "logs"
    where = f"Ray's logs: {driver_log} (this process) and {logs} (workers, Ray Data, Serve)"
    print(where)
    try:
        print("\n### 1/4 Ray Train + DeepSpeed, 2 workers")
        summary = run_ray_training(config)
        for record in summary["history"]:
            print(epoch_line(record))
        print("test NDCG@10: " + json.dumps({k.split("/")[1]: round(v, 4) for k, v in summary["test"].items()
                                             if k.endswith("ndcg@10") and "/" in k and "sampled" not in k}))

        print(f"\n### 2/4 Ray Tune: {trials} trials over fusion_dim and lr (1 worker each)")
        tune_base = config.replace(**{"output": str(Path(config.output) / "tune"), "ray.num_workers": 1,
                                      "train.epochs": 2})
        tc = tune_config_from_dict({"num_samples": trials, "scheduler": "none",
                                    "space": {"model.fusion_dim": {"choice": [32, 64]},
                                              "train.lr": {"loguniform": [1e-3, 5e-3]}}})
        result = run_tune(tune_base, tc)
        best = Path(tune_base.output) / "best"

        print(f"\n### 3/4 Ray Serve hosts {best}")
        url = deploy(str(best), ServeConfig(port=_free_port()))
        print(f"serving at {url}")

        print("\n### 4/4 three queries over HTTP")
        rec = Recommender.load(best)  # only to pick a known user and two items for the queries
        with RecommenderClient(url) as client:
            for title, q in _queries(rec.users.raw_ids, rec.items.raw_ids):
                answer = client.recommend(k=5, **q)
                print(f"\n== {title} (path: {answer.path})")
                for item in answer.items:
                    print(f"  {str(item.item_id):>10}  {item.score:8.3f}  {(item.text or '')[:70]}")
        print(f"\nbest trial: {json.dumps(result['best'].get('metrics', {}), default=str)[:300]}")
    finally:
        # ray.shutdown() stops the local Ray instance this process started, Serve included. serve.shutdown()
        # first would end the Serve controller while its own calls are pending, and the raylet then reports
        # each of them as a failed task on this console.
        ray.shutdown()
    print(f"\n{where}")
    return 0
