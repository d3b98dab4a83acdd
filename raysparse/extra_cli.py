"""`raysparse serve | query | tune`: thin argument parsing (`demo` registers itself in raysparse.demo).

Ray is imported only inside the command that needs it; `query` speaks plain HTTP.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from raysparse.client import DEFAULT_URL, RecommenderClient
from raysparse.config import Config, describe_config
from raysparse.errors import UserError
from raysparse.http_api import check_artifact, run_plain
from raysparse.ray_serve import deploy
from raysparse.ray_tune import run_tune
from raysparse.serve_config import add_serve_arguments, serve_config_from_args
from raysparse.sweep import BEST_DIR, TuneConfig, describe_tune_config, load_tune_config
from raysparse.train_cli import add_config_arguments, shortcut_sets


def register(subparsers) -> None:
    register_serve(subparsers)
    register_query(subparsers)
    register_tune(subparsers)


# ---- serve ------------------------------------------------------------------------------------------------------


def register_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="Serve an artifact over HTTP with Ray Serve (POST /recommend, /docs).",
        description="Serve a trained artifact: POST /recommend, GET /items/{item_id}, GET /healthz, OpenAPI at "
                    "/docs. Without --address this starts a private local Ray and serves until Ctrl-C. With "
                    "--address it deploys onto that cluster and returns; the app keeps serving there, and "
                    "running the command again with a new --artifact hot-swaps the model.")
    parser.add_argument("--artifact", required=True, help="Artifact directory written by `raysparse train`.")
    parser.add_argument("--address", default="",
                        help="Ray cluster to deploy onto ('auto' = the one `ray start` runs here, or host:port). "
                             "Empty: start a local Ray for this command.")
    parser.add_argument("--plain", action="store_true",
                        help="Serve the same API without Ray: one uvicorn process, no replicas, batching or hot "
                             "swap (for machines without Ray).")
    add_serve_arguments(parser)
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    config = serve_config_from_args(args)        # bad flags fail here, before anything starts
    artifact = check_artifact(args.artifact)
    if args.plain:
        if args.address:
            raise UserError("--plain serves without Ray; drop --address (or drop --plain).")
        print(f"serving {artifact} without Ray at {config.url()} (docs: {config.url()}/docs)", flush=True)
        run_plain(artifact, config)
        return 0

    import ray
    from ray import serve

    ray.init(address=args.address or "local")
    url = deploy(artifact, config)
    print(f"serving {artifact} at {url} (docs: {url}/docs)", flush=True)
    if args.address:
        print(f"the app '{config.app_name}' keeps serving on the cluster; stop it with `serve shutdown` or "
              f"`serve delete {config.app_name}`.")
        return 0
    print("press Ctrl-C to stop", flush=True)
    # `kill` (SIGTERM) stops it as cleanly as Ctrl-C: the finally block shuts Serve and this Ray down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


# ---- query ------------------------------------------------------------------------------------------------------


def register_query(subparsers) -> None:
    parser = subparsers.add_parser(
        "query", help="Ask a running server for recommendations (or an item, or its health).",
        description="Examples: raysparse query --user-id u042 | --history i007 i311 | --text 'space opera' | "
                    "--item i007 | --health")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Server URL incl. route prefix (default {DEFAULT_URL}).")
    parser.add_argument("--user-id", default=None, help="A user known at training.")
    parser.add_argument("--history", nargs="+", default=None, metavar="ITEM_ID",
                        help="Item ids, oldest first (with --user-id: interactions newer than training).")
    parser.add_argument("--text", default=None, help="A description of a user with no history.")
    parser.add_argument("--item", default=None, metavar="ITEM_ID", help="Show one catalogue item instead.")
    parser.add_argument("--health", action="store_true", help="Show the server's health and model instead.")
    parser.add_argument("-k", type=int, default=10, help="How many items (1-1000; default 10).")
    parser.add_argument("--include-seen", action="store_true", help="Do not leave out items the user has seen.")
    parser.add_argument("--exclude", nargs="+", default=None, metavar="ITEM_ID", help="Item ids to leave out.")
    parser.add_argument("--json", action="store_true", help="Print the server's JSON instead of a table.")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="HTTP timeout in seconds.")
    parser.set_defaults(func=run_query)


def run_query(args: argparse.Namespace) -> int:
    asked = [args.user_id is not None or args.history is not None, args.text is not None, args.item is not None,
             args.health]
    if sum(asked) != 1:
        raise UserError("send one of: --user-id and/or --history, --text, --item or --health; e.g. "
                    "`raysparse query --user-id u042 -k 10`.")
    with RecommenderClient(args.url, timeout_s=args.timeout_s) as client:
        if args.health:
            print(json.dumps(client.health(), indent=2))
            return 0
        if args.item is not None:
            print(json.dumps(client.item(args.item), indent=2, default=str))
            return 0
        result = client.recommend(user_id=args.user_id, history=args.history, text=args.text, k=args.k,
                                  exclude_seen=not args.include_seen, exclude=args.exclude)
    if args.json:
        print(json.dumps({"path": result.path, "model_id": result.model_id, "notes": result.notes,
                          "items": [vars(i) for i in result.items]}, indent=2, default=str))
        return 0
    print(f"path={result.path} model={result.model_id}")
    width = max([len(str(i.item_id)) for i in result.items] + [7])
    print(f"{'rank':>4}  {'item_id':<{width}}  {'score':>9}  title")
    for rank, item in enumerate(result.items, 1):
        title = item.title if item.title is not None else (item.text or "")
        print(f"{rank:>4}  {str(item.item_id):<{width}}  {item.score:>9.4f}  {title[:60]}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---- tune -------------------------------------------------------------------------------------------------------


def register_tune(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="Hyperparameter sweep: each trial a distributed training run (Ray Tune + Ray Train).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sweep the `tune:` section's space; writes <output>/trials.csv and <output>/best (the best "
                    "trial's artifact with summary.json).\n\n" + tune_help())
    add_tune_arguments(parser)
    parser.set_defaults(func=run_tune_command)


def tune_help() -> str:
    """Every sweep key and every run key, for `raysparse tune --help` and `jobs/tune.py --help`."""
    return describe_tune_config() + "\n\n" + describe_config()


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=None, help="Trials; overrides tune.num_samples.")
    parser.add_argument("--resume", action="store_true", help="Continue the interrupted sweep in <output>.")


def tune_configs_from_args(args: argparse.Namespace) -> tuple[Config, TuneConfig]:
    sets = shortcut_sets(args)
    if args.num_samples is not None:
        sets.append(f"tune.num_samples={args.num_samples}")
    return load_tune_config(args.config, sets)


def run_tune_command(args: argparse.Namespace) -> int:
    config, tc = tune_configs_from_args(args)
    result = run_tune(config, tc, resume=args.resume)
    best = result["best"]
    print(json.dumps({"best_trial": best["trial_id"], "best_epoch": best["best_epoch"], best["metric"]: best["value"],
                      "artifact": str(Path(config.output).resolve() / BEST_DIR)}, indent=2))
    return 0
