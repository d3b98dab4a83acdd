"""`raysparse demo`: the whole path on the embedded default, in a few minutes on 2 cores.

synthetic data -> Ray Train + DeepSpeed on local Ray (2 workers) -> a 2-trial Ray Tune sweep -> Ray Serve
hosts the best artifact -> three queries over HTTP (a known user, a new user by history, a new user by
text) -> shutdown. `--local` trains in this process instead and queries the Python API.
"""

from __future__ import annotations

import argparse
import json
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
    import ray
    from ray import serve

    from raysparse.ray_serve import deploy
    from raysparse.ray_train import run_ray_training
    from raysparse.ray_tune import run_tune

    # Workers' and Ray's own output (actor logs, controller warnings) stay in the session's log files; this
    # process prints the story: each stage, its metrics, the three answers.
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    logs = Path(context.address_info["session_dir"]) / "logs"
    print(f"Ray's own output and every worker's: {logs}")
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
        serve.shutdown()
        ray.shutdown()
    print(f"\nRay's logs of this run: {logs}")
    return 0
