"""Hyperparameter sweep on the Ray cluster this job runs in (Ray Tune around Ray Train + DeepSpeed); same
arguments as `raysparse tune`.

    ray up cluster.yaml            # or a local head: ray start --head --dashboard-host=127.0.0.1
    RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 \
        ray job submit --working-dir . -- python jobs/tune.py --config configs/tune_tiny.yaml --output /shared/runs/sweep

Writes <output>/trials.csv (one row per trial), <output>/best (the best trial's artifact + summary.json),
<output>/trials/<trial_id> (each trial's run) and <output>/tune (Tune's experiment, for --resume). On a
multi-node cluster put `output` on storage every node reaches. Every key: `python jobs/tune.py --help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raysparse.config import describe_config
from raysparse.errors import UserError
from raysparse.ray_tune import BEST_DIR, add_tune_arguments, describe_tune_config, run_tune, tune_configs_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + "\n\n" + describe_tune_config() + "\n\n"
                                     + describe_config(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config, tc = tune_configs_from_args(args)
        # Inside `ray job submit`, RAY_ADDRESS names the job's cluster; ray_train.connect joins it.
        result = run_tune(config, tc, resume=args.resume)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = result["best"]
    print(json.dumps({"best_trial": best["trial_id"], "best_epoch": best["best_epoch"], best["metric"]: best["value"],
                      "artifact": str(Path(config.output).resolve() / BEST_DIR)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
