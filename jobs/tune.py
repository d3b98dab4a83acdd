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
import sys

from raysparse.errors import UserError
from raysparse.extra_cli import add_tune_arguments, run_tune_command, tune_help


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + "\n\n" + tune_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser)
    args = parser.parse_args(argv)
    try:
        # Inside `ray job submit`, RAY_ADDRESS names the job's cluster; ray_train.connect joins it.
        return run_tune_command(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
