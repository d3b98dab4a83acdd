"""`raysparse train`: one process with --local, else Ray Train + DeepSpeed on the current Ray cluster."""

from __future__ import annotations

import argparse
import json

from raysparse.config import describe_config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (sections: data, model, train, ray).")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Override one config key; repeatable. E.g. --set model.fusion_dim=64.")
    parser.add_argument("--output", default=None, help="Shortcut for --set output=DIR.")
    parser.add_argument("--on-bad-rows", choices=("fail", "quarantine"), default=None,
                        help="Shortcut for --set data.on_bad_rows=...: 'quarantine' sets invalid interaction rows "
                             "aside in <output>/quarantine.csv and trains on the rest; 'fail' (the default) stops "
                             "on them.")


def shortcut_sets(args: argparse.Namespace) -> list[str]:
    """The --set overrides, then the shortcut flags' (--output, --on-bad-rows), which win when both are given."""
    sets = list(args.sets)
    if getattr(args, "output", None):
        sets.append(f"output={args.output}")
    if getattr(args, "on_bad_rows", None):
        sets.append(f"data.on_bad_rows={args.on_bad_rows}")
    return sets


def config_from_args(args: argparse.Namespace):
    return load_config(args.config, shortcut_sets(args))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="Train the hybrid recommender.", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train on the configured data; writes <output>/artifact and <output>/summary.json.\n\n"
                    + describe_config())
    add_config_arguments(parser)
    parser.add_argument("--local", action="store_true", help="Train in this process without Ray.")
    parser.add_argument("--resume", action="store_true", help="Continue the stopped Ray run in <output>.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.local:
        from raysparse.local import run_local

        _, summary = run_local(config)
    else:
        from raysparse.ray_train import run_ray_training

        summary = run_ray_training(config, resume=args.resume)
    shown = {k: round(v, 4) for k, v in summary["test"].items()
             if k.endswith(("ndcg@10", "hr@10")) and "/" in k and "sampled" not in k}
    print(json.dumps({"best_epoch": summary.get("best_epoch"), "test": shown}, indent=2))
    return 0
