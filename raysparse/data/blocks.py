"""The per-block and per-user steps of reading a log in parallel: each function takes one block (a pyarrow
Table or pandas DataFrame of some rows) or one user's rows and returns a block, so any executor can map it.
`raysparse.ray_data` maps them with Ray Data; they import neither ray nor deepspeed, and tests call them on
plain frames.

  validate_block   the core's row rules (`raysparse.data.io.validate_interactions`) on one block: good rows
                   with dense item indices, then one report row carrying the block's counts and samples
  report_rows      either half of a validated block: the good rows or the report rows
  user_sequence    one user's validated rows -> one row: the rules that need all of a user's rows (exact
                   duplicates across blocks, time order, repeat consumption)
  merge_reports    the block reports (+ duplicates found across blocks) -> one `ValidationReport`
  expand_examples  rows (user_idx, start, length) -> one row per training example (user_idx, position, target)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from raysparse.data.examples import is_example
from raysparse.data.io import (FIX_HINT, MAX_SAMPLES, REASONS, ValidationReport, arrow_to_pandas,
                               validate_interactions)
from raysparse.errors import DataError

UNKNOWN_LINE = -1  # a parallel reader does not track file lines; samples say "file: values" instead


def validate_block(batch: pa.Table, catalogue: pd.DataFrame, rating_range: tuple[float, float]) -> pd.DataFrame:
    """Core row rules on one block (a pyarrow Table with a `path` column naming each row's file, converted to
    pandas as the core's reader does, so the parsers see the same dtypes). Out: good rows (user_id str,
    item_idx, timestamp, rating, _report="") followed by one report row whose `_report` holds this block's
    counts and samples as JSON."""
    frame = arrow_to_pandas(batch).rename(columns={"path": "_source"})
    frame["_source"] = frame["_source"].map(lambda p: Path(str(p)).name)
    frame["_line"] = UNKNOWN_LINE
    good, report = validate_interactions(frame, "interaction log", catalogue=catalogue, on_bad_rows="quarantine",
                                         quarantine_dir=None, rating_range=rating_range)
    item_idx = pd.Index(catalogue["item_id"]).get_indexer(good["item_id"])
    user_is_int = good["user_id"].dtype.kind in "iu"
    out = pd.DataFrame({
        "user_id": good["user_id"].astype(str).to_numpy(dtype=object),
        "item_idx": item_idx.astype(np.int64),
        "timestamp": (good["timestamp"].to_numpy(np.int64) if "timestamp" in good
                      else np.full(len(good), -1, np.int64)),
        "rating": (good["rating"].to_numpy(np.float32) if "rating" in good
                   else np.full(len(good), np.nan, np.float32)),
        "_report": "",
    })
    summary = report.to_dict()
    summary["user_id_int"] = bool(user_is_int) or len(good) == 0
    summary["has_timestamp"] = "timestamp" in good
    summary["has_rating"] = "rating" in good
    report_row = pd.DataFrame({"user_id": [""], "item_idx": [-1], "timestamp": [-1], "rating": [np.nan],
                               "_report": [json.dumps(summary)]})
    report_row = report_row.astype({"item_idx": np.int64, "timestamp": np.int64, "rating": np.float32})
    return pd.concat([out, report_row], ignore_index=True)


def report_rows(batch: pd.DataFrame, reports: bool) -> pd.DataFrame:
    """Of a `validate_block` output: its report rows (reports=True) or its good rows without `_report`."""
    keep = (batch["_report"] != "") if reports else (batch["_report"] == "")
    out = batch[keep.to_numpy()]
    return out if reports else out.drop(columns="_report")


def user_sequence(group: pd.DataFrame) -> pd.DataFrame:
    """One user's validated rows -> one row: items/ratings in time order (ties: item index), exact duplicates
    across blocks dropped (counted), repeat consumption collapsed to the latest occurrence (counted), as
    `raysparse.data.split.split_last_item` does."""
    group = group.sort_values(["timestamp", "item_idx", "rating"], kind="stable")
    dup = group.duplicated(["item_idx", "timestamp", "rating"], keep="first").to_numpy()
    sample = ""
    if dup.any():
        row = group.iloc[int(np.flatnonzero(dup)[0])]
        sample = f"user_id={row['user_id']} item_idx={int(row['item_idx'])} timestamp={int(row['timestamp'])}"
    group = group[~dup]
    repeat = group.duplicated(["item_idx"], keep="last").to_numpy()
    kept = group[~repeat]
    return pd.DataFrame({"user_id": [group["user_id"].iloc[0]],
                         "items": [kept["item_idx"].to_numpy(np.int64)],
                         "ratings": [kept["rating"].to_numpy(np.float32)],
                         "duplicates": [int(dup.sum())], "duplicate_sample": [sample],
                         "repeats": [int(repeat.sum())]})


def merge_reports(reports: list[dict], duplicates: int, duplicate_samples: list[str],
                  on_bad_rows: str, name: str) -> ValidationReport:
    """Sum block reports (+ duplicates found across blocks); raise like the core in 'fail' mode."""
    rows_in = sum(r["rows_in"] for r in reports)
    problems: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    for r in reports:
        for reason, count in r["problems"].items():
            problems[reason] = problems.get(reason, 0) + count
            room = MAX_SAMPLES - len(samples.get(reason, []))
            samples.setdefault(reason, []).extend(
                s.replace(f" line {UNKNOWN_LINE}:", ":") for s in r["samples"].get(reason, [])[:room])
    if duplicates:
        problems["duplicate row"] = problems.get("duplicate row", 0) + duplicates
        room = MAX_SAMPLES - len(samples.get("duplicate row", []))
        samples.setdefault("duplicate row", []).extend(duplicate_samples[:room])
    problems = {reason: problems[reason] for reason in REASONS if reason in problems}
    n_bad = sum(problems.values())
    if n_bad and on_bad_rows == "fail":
        parts = "; ".join(f"{reason}: {count} row(s), e.g. {samples[reason][0]}" for reason, count in problems.items())
        raise DataError(f"{name}: {n_bad} of {rows_in} interaction rows are invalid -- {parts}. To continue, "
                        f"{FIX_HINT}.")
    return ValidationReport(rows_in=rows_in, rows_used=rows_in - n_bad, rows_quarantined=n_bad,
                            problems=problems, samples=samples)


def expand_examples(batch: dict[str, np.ndarray], train_items: np.ndarray, mode: str, max_history: int
                    ) -> dict[str, np.ndarray]:
    """Rows (user_idx, start, length) -> one row per training example (user_idx, position, target), the
    examples of `BatchBuilder.training_examples(mode)`: prefix mode predicts position p >= 1 from the items
    before it; rest mode predicts any position of a user with >= 2 training items from the others; sequence
    mode names each window of max_history transitions by its last item (`is_example`).
    train_items: `Split.train_items`, which start/length index."""
    users, starts, lengths = batch["user_idx"], batch["start"], batch["length"]
    rep_users = np.repeat(users, lengths)
    rep_starts = np.repeat(starts, lengths)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    keep = is_example(positions, np.repeat(lengths, lengths), mode, max_history)
    # Shuffled inside the block (seeded by its first user): a block mixes many users in random order.
    order = np.random.default_rng(int(users[0]) if len(users) else 0).permutation(int(keep.sum()))
    return {"user_idx": rep_users[keep].astype(np.int64)[order], "position": positions[keep][order],
            "target": train_items[rep_starts[keep] + positions[keep]].astype(np.int64)[order]}
