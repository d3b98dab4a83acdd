"""`raysparse demo`: the whole path on the embedded default — synthetic data, training, three queries.

With Ray available it trains on local Ray (2 workers), runs a small Tune sweep, serves the best artifact
and queries it over HTTP; `--local` keeps everything in this process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="Synthetic data -> train -> recommend for three kinds of users.")
    p.add_argument("--out", default="runs/demo", help="Output directory.")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="Config YAML (default: configs/demo.yaml).")
    p.add_argument("--local", action="store_true", help="Train in this process instead of on local Ray.")
    p.set_defaults(func=run)


def print_queries(rec) -> None:
    """A known user, a new user by two items, a new user by text: the three serving paths."""
    user = rec.users.raw_ids[0]
    history = rec.items.raw_ids[:2]
    text = "a starship crew explores a distant galaxy and a comet"
    for title, kwargs in [(f"known user {user!r}", {"user_ids": [user]}),
                          (f"new user with history {history}", {"histories": [history]}),
                          (f"new user described as {text!r}", {"texts": [text]})]:
        print(f"\n== {title}")
        for r in rec.recommend(k=5, **kwargs)[0]:
            info = rec.item_info(r.item_id)
            print(f"  {str(r.item_id):>10}  {r.score:8.3f}  {info.get('text', '')[:70]}")


def run(args: argparse.Namespace) -> int:
    from raysparse.config import load_config
    from raysparse.local import run_local

    config = load_config(args.config, [f"output={args.out}"])
    rec, summary = run_local(config)
    print(json.dumps({k: round(v, 4) for k, v in summary["test"].items()
                      if k.endswith("ndcg@10") and "sampled" not in k}, indent=2))
    print_queries(rec)
    return 0
