"""`raysparse data synthetic | convert | check`: make, convert and validate datasets."""

from __future__ import annotations

import argparse
import json

from raysparse.errors import DataError


def _synthetic(args: argparse.Namespace) -> int:
    from raysparse.data.synthetic import generate_synthetic

    counts = generate_synthetic(args.out, args.users, args.items, seed=args.seed, n_topics=args.topics,
                                mean_interactions=args.mean_interactions)
    print(f"wrote {args.out}/interactions.parquet and {args.out}/items.parquet: {json.dumps(counts)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from raysparse.data.amazon import FORMAT as AMAZON_FORMAT, convert_amazon_json
    from raysparse.data.movielens import convert_movielens

    rows = {"on_bad_rows": args.on_bad_rows, "quarantine_dir": args.dst}   # quarantine.csv beside the output
    if args.format == AMAZON_FORMAT:
        report = convert_amazon_json(args.src, args.dst, **rows)
    else:
        report = convert_movielens(args.format, args.src, args.dst, **rows)
    print(f"wrote {args.dst}/interactions.parquet and {args.dst}/items.parquet")
    print(report.summary())
    return 0


def _check(args: argparse.Namespace) -> int:
    """Read and validate in quarantine mode with no quarantine folder: counts only, nothing written."""
    from raysparse.data.io import find_dataset_files, read_catalogue, read_interactions

    interactions_path, found_items = find_dataset_files(args.path)
    items_path = args.items or found_items
    problems = 0
    catalogue = None
    if items_path:
        try:
            catalogue = read_catalogue(items_path)
            print(f"catalogue {items_path}: {len(catalogue):,} items, columns {list(catalogue.columns)}")
        except DataError as err:
            print(f"catalogue problem: {err}")
            print("interactions are checked without the catalogue.")
            problems += 1
    else:
        print(f"no item catalogue found for {args.path} (pass --items PATH); items are not checked against one.")
    try:
        _, report = read_interactions(interactions_path, catalogue=catalogue, on_bad_rows="quarantine",
                                      quarantine_dir=None)
    except DataError as err:  # file-level problems: missing columns, unparsable file, no rows
        print(f"interactions problem: {err}")
        return 1
    print(f"interactions {interactions_path}:")
    print(report.summary())
    problems += report.rows_quarantined
    print("clean" if problems == 0 else "problems found (nothing was changed)")
    return 0 if problems == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` and its subcommands to the top-level parser."""
    from raysparse.data.amazon import FORMAT as AMAZON_FORMAT
    from raysparse.data.movielens import FORMATS

    data = subparsers.add_parser("data", help="Make, convert and check datasets.",
                                 description="Make, convert and check datasets in the standard schema.")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synthetic", help="Generate the synthetic dataset (planted topics, string ids).")
    p.add_argument("--out", required=True, help="Output folder: interactions.parquet + items.parquet.")
    p.add_argument("--users", type=int, default=2000, help="Number of users (default 2000).")
    p.add_argument("--items", type=int, default=500, help="Number of items (default 500).")
    p.add_argument("--seed", type=int, default=0, help="Random seed (same seed, same files).")
    p.add_argument("--topics", type=int, default=12, help="Number of latent topics (default 12).")
    p.add_argument("--mean-interactions", type=float, default=25.0,
                   help="Mean interactions per user before de-duplication (default 25).")
    p.set_defaults(func=_synthetic)

    p = sub.add_parser("convert", help="Convert a MovieLens download or an Amazon JSON folder to the standard "
                                       "schema.")
    p.add_argument("--format", required=True, choices=(*FORMATS, AMAZON_FORMAT),
                   help=f"Which layout SRC holds: a MovieLens release, or {AMAZON_FORMAT} (<Name>.inter.json "
                        f"+ <Name>.item.json).")
    p.add_argument("src", help="Unzipped MovieLens folder (e.g. ml-latest-small/) or Amazon JSON folder "
                               "(e.g. amazon-scientific/).")
    p.add_argument("dst", help="Output folder: interactions.parquet + items.parquet.")
    p.add_argument("--on-bad-rows", choices=("fail", "quarantine"), default="fail",
                   help="'fail' (default): stop on invalid interaction rows, naming file, line and a sample. "
                        "'quarantine': write them to DST/quarantine.csv and convert the rest.")
    p.set_defaults(func=_convert)

    p = sub.add_parser("check", help="Validate a dataset and report bad rows; changes nothing.",
                       description="Read and validate a dataset, print rows in / used / quarantined per reason "
                                   "with samples. Writes nothing. Exit 0 if clean, 1 if problems.")
    p.add_argument("path", help="Dataset folder, or an interactions file / folder of files.")
    p.add_argument("--items", default="", help="Item catalogue (default: items.* beside the interactions).")
    p.set_defaults(func=_check)
