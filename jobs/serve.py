"""Deploy an artifact onto the Ray cluster this job runs in; the app keeps serving after the job ends.

    RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 \
        ray job submit --working-dir . -- python jobs/serve.py --artifact /shared/runs/demo/artifact

Submitting again with another --artifact hot-swaps the model of the running app (no failed requests).
Flags are those of `raysparse serve` (`python jobs/serve.py --help`: --config FILE, --set serve.KEY=VALUE, one
flag per key); the artifact path must be readable on the nodes that run replicas.
"""

from __future__ import annotations

import argparse
import sys

from raysparse.errors import UserError
from raysparse.http_api import check_artifact
from raysparse.ray_serve import deploy
from raysparse.serve_config import add_serve_arguments, serve_config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True, help="Artifact directory written by `raysparse train`.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = serve_config_from_args(args)
        artifact = check_artifact(args.artifact)
        import ray

        ray.init()  # inside `ray job submit`: the job's cluster
        url = deploy(artifact, config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving {artifact} at {url} (docs: {url}/docs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
