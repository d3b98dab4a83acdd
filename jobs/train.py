"""Train on the Ray cluster this job runs in (Ray Train + DeepSpeed); same arguments as `raysparse train`.

    ray up cluster.yaml            # or a local head: ray start --head --dashboard-host=127.0.0.1
    RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 \
        ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml --output /shared/runs/tiny

Writes <output>/artifact (the serving artifact of the best epoch), <output>/summary.json and <output>/logs.
On a multi-node cluster put `output` (and ray.storage_path, default <output>/ray) on storage every node
reaches (NFS, or s3://... for ray.storage_path). Every config key: `python jobs/train.py --help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raysparse.config import describe_config
from raysparse.errors import UserError
from raysparse.train_cli import add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + "\n\n" + describe_config(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="Continue the stopped run in <output>.")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        from raysparse.ray_train import run_ray_training

        # Inside `ray job submit`, RAY_ADDRESS names the job's cluster; ray_train.connect joins it.
        summary = run_ray_training(config, resume=args.resume)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shown = {k: round(v, 4) for k, v in summary["test"].items()
             if k.endswith(("ndcg@10", "hr@10")) and "sampled" not in k}
    print(json.dumps({"best_epoch": summary["best_epoch"], "test": shown,
                      "artifact": str(Path(config.output).resolve() / "artifact")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
