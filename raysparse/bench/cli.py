"""`raysparse bench data|step|train|gpu|serve|accuracy|scale`: each benchmark module registers its own command."""

from __future__ import annotations

import importlib

BENCH_MODULES = [
    "raysparse.bench.data_bench",      # bench data
    "raysparse.bench.step_bench",      # bench step
    "raysparse.bench.train_bench",     # bench train, bench gpu
    "raysparse.bench.serve_bench",     # bench serve
    "raysparse.bench.accuracy",        # bench accuracy
    "raysparse.bench.scale_bench",     # bench scale
]


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="Benchmarks that print a table (speed, memory, accuracy).")
    bench = parser.add_subparsers(dest="bench", required=True)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register_bench(bench)
