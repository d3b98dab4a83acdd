"""Ray Data side of training: read + validate large interaction logs, and the training-example dataset that
each Ray Train worker iterates.

Which preparation path runs (`choose_reader`):
  * pandas (`raysparse.build.prepare_data`, the core's reader): a local dataset whose files total less than
    `RAY_DATA_MIN_BYTES` (256 MiB). The whole log is read in the driver; line numbers in error messages are
    exact and `on_bad_rows=quarantine` writes quarantine.csv. Every test dataset and the demo take this path.
  * Ray Data (`prepare_data_ray`): any URI pyarrow understands (s3://, gs://, ...) and local logs of
    `RAY_DATA_MIN_BYTES` or more. Force either path with `RAYSPARSE_READER=pandas|ray`.

The Ray Data path, step by step (the raw log never comes to the driver):
  1. `ray.data.read_parquet|read_csv|read_json` over the interaction files (`include_paths=True`).
  2. `map_batches(_validate_block)`: the core's row rules (`raysparse.data.io.validate_interactions`: ids,
     ratings, timestamps, catalogue membership, duplicates within the block) per block; good rows come out
     with dense item indices, plus a few "report rows" per block carrying that block's counts and samples
     (a side output; the validated dataset is materialized, so it is computed once).
  3. `groupby("user_id").map_groups(_user_sequence)`: the rules that need global state are per user, so a
     group holds all a rule needs: exact duplicates across blocks (a duplicate has the same user), time order,
     and repeat consumption (keep the latest (user, item), as `split_last_item` does).
  4. The driver collects one compact row per user (int item indices, float ratings) and builds the `Split`:
     the last-item hold-out and the seeded sparse cohort, with the same rules as the core's `split_last_item`.
     The driver holds the training CSR (about 12 bytes per interaction), which every worker needs anyway.
Differences from the pandas path, by design: users are indexed in sorted raw-id order (Ray Data has no
global file order), timestamp ties break by item index instead of file order, so a timestamp column is
required; samples in messages name the file and the values but not the line; quarantine mode reports counts
and samples but writes no quarantine.csv.

Training examples, both paths (`build_example_dataset`): one row per user (user_idx, start, length) becomes
rows {user_idx, position, target} with `map_batches(_expand_examples)`, exactly the examples of the core's
`BatchBuilder.training_examples`, shuffled inside each block. The dataset is materialized once, its
blocks put in one seeded order (`fixed_block_order`), and Ray Train splits it into one equal shard per worker
(`ray.train.get_dataset_shard("train")`): the same blocks reach the same worker in the same order every epoch.
Each epoch's order is drawn by the worker (`iter_example_batches`, seeded by seed, epoch and rank), so it is a
function of the epoch alone and a restored run draws what the uninterrupted run drew (issue 16). A reseeding
`randomize_block_order` would not be: its seed counts the dataset's executions, which restart at 0 in the
fresh dataset of a resumed run and move with whatever else ran in the driver's process.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import ray

from raysparse.build import Prepared
from raysparse.config import Config
from raysparse.data.dataset import IndexedLog
from raysparse.data.io import (FIX_HINT, FORMATS, MAX_SAMPLES, REASONS, ValidationReport, read_catalogue,
                               validate_interactions)
from raysparse.data.split import Split, split_sorted_sequences
from raysparse.data.text import render_item_texts
from raysparse.data.vocab import Vocab
from raysparse.errors import ConfigError, DataError

RAY_DATA_MIN_BYTES = 256 * 2**20
READER_ENV = "RAYSPARSE_READER"
_UNKNOWN_LINE = -1  # Ray Data does not track file lines; samples say "file: values" instead


# ------------------------------------------------------------------------------------------------ files

def _filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _list_data_files(path: str) -> list[str]:
    """Files a path names (itself, or the visible files of a folder), all one format; as URIs for URIs."""
    import pyarrow.fs as pafs

    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path!r} does not exist; pass a .parquet, .csv or .jsonl file or a folder of them.")
    if info.type == pafs.FileType.File:
        files = [inner]
    else:
        entries = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
        files = sorted(e.path for e in entries if e.type == pafs.FileType.File
                       and not e.base_name.startswith((".", "_")))
        if not files:
            raise DataError(f"{path}: folder has no data files; put .parquet, .csv or .jsonl files in it.")
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise DataError(f"{bad}: unknown file format {Path(bad).suffix!r}; use one of {', '.join(FORMATS)}.")
    if len(kinds) > 1:
        raise DataError(f"{path}: folder mixes formats ({', '.join(sorted(kinds))}); keep one format per folder.")
    scheme = path.split("://", 1)[0] + "://" if _is_uri(path) else ""
    return [scheme + f if scheme and not f.startswith(scheme) else f for f in files]


def find_dataset_inputs(path: str, items_path: str = "") -> tuple[str, str]:
    """(interactions path, catalogue path) for a dataset folder or an interactions path + `items_path`,
    local or URI (the URI version of `raysparse.data.io.find_dataset_files`)."""
    import pyarrow.fs as pafs

    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"dataset path {path!r} does not exist; pass a dataset folder (interactions.* + items.*), "
                        f"an interactions file (.parquet, .csv, .jsonl) or a folder of such files.")
    interactions, items = path, ""
    if info.type == pafs.FileType.Directory:
        names = {e.base_name: e for e in fs.get_file_info(pafs.FileSelector(inner, recursive=False))}
        for stem in ("interactions", "items"):
            found = [n for n in names if n == stem or (Path(n).stem == stem and Path(n).suffix in FORMATS)]
            if len(found) > 1:
                raise DataError(f"{path}: found several {stem} inputs ({', '.join(found)}); keep exactly one.")
            if found:
                joined = path.rstrip("/") + "/" + found[0]
                if stem == "interactions":
                    interactions = joined
                else:
                    items = joined
    items = items_path or items
    if not items:
        raise DataError(f"{path}: no item catalogue found; set data.items_path or put items.parquet, items.csv "
                        f"or items.jsonl beside the interactions.")
    return interactions, items


def input_bytes(path: str) -> int:
    """Total size of the interaction files of a dataset (0 when it cannot be listed)."""
    try:
        interactions, _ = find_dataset_inputs(path, "-")
        fs, _ = _filesystem(interactions)
        return sum(fs.get_file_info(_filesystem(f)[1]).size or 0 for f in _list_data_files(interactions))
    except (DataError, OSError):
        return 0


def choose_reader(config: Config) -> str:
    """'pandas' or 'ray' (see the module docstring). RAYSPARSE_READER=pandas|ray forces one."""
    forced = os.environ.get(READER_ENV, "auto")
    if forced not in ("auto", "pandas", "ray"):
        raise ConfigError(f"{READER_ENV}={forced!r} is not allowed; use 'pandas', 'ray' or unset it (auto).")
    if forced != "auto":
        return forced
    path = config.data.path
    if not path:                   # the embedded synthetic dataset: generated locally, small
        return "pandas"
    if _is_uri(path):
        return "ray"
    return "ray" if input_bytes(path) >= RAY_DATA_MIN_BYTES else "pandas"


def _local_copy(path: str, folder: str) -> str:
    """A URI file or folder copied into `folder` (catalogues are small); local paths as they are."""
    if path.startswith("file://"):
        return path[len("file://"):]
    if not _is_uri(path):
        return path
    import pyarrow.fs as pafs

    files = _list_data_files(path)
    target = Path(folder) / "catalogue"
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        pafs.copy_files(f, str(target / Path(f).name))
    return str(target if len(files) > 1 else target / Path(files[0]).name)


# ------------------------------------------------------------------------------------------------ reading

def read_interaction_dataset(path: str) -> "ray.data.Dataset":
    """The raw interaction log as a Ray Dataset with a `path` column (which file each row came from).

    CSV columns are read as text (pyarrow infers a CSV column's type from its first block, and a later bad
    value would fail the whole read); the core's parsers turn them into ids, floats and timestamps, so a bad
    value becomes a reported row instead.
    """
    files = _list_data_files(path)
    kind = FORMATS[Path(files[0]).suffix.lower()]
    if kind == "parquet":
        return ray.data.read_parquet(files, include_paths=True)
    if kind == "csv":
        import pyarrow as pa
        import pyarrow.csv as pa_csv

        header = _csv_columns(files[0])
        convert = pa_csv.ConvertOptions(strings_can_be_null=True,
                                        column_types={c: pa.string() for c in header})
        parse = pa_csv.ParseOptions(ignore_empty_lines=False)
        return ray.data.read_csv(files, include_paths=True, convert_options=convert, parse_options=parse)
    return ray.data.read_json(files, include_paths=True, lines=True)


def _csv_columns(file: str) -> list[str]:
    import csv
    import io

    fs, inner = _filesystem(file)
    with fs.open_input_stream(inner) as stream:
        head = stream.read(1 << 16).decode("utf-8", errors="replace")
    return next(csv.reader(io.StringIO(head)), [])


def _validate_block(batch, catalogue_ref, rating_range: tuple[float, float]) -> pd.DataFrame:
    """Core row rules on one block (a pyarrow Table, converted to pandas as the core's reader does, so
    the parsers see the same dtypes). Out: good rows (user_id str, item_idx, timestamp, rating, _report="")
    followed by one report row whose `_report` holds this block's counts and samples as JSON."""
    from raysparse.data.io import arrow_to_pandas

    catalogue = ray.get(catalogue_ref) if isinstance(catalogue_ref, ray.ObjectRef) else catalogue_ref
    frame = arrow_to_pandas(batch).rename(columns={"path": "_source"})
    frame["_source"] = frame["_source"].map(lambda p: Path(str(p)).name)
    frame["_line"] = _UNKNOWN_LINE
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


def _select(batch: pd.DataFrame, reports: bool) -> pd.DataFrame:
    keep = (batch["_report"] != "") if reports else (batch["_report"] == "")
    out = batch[keep.to_numpy()]
    return out if reports else out.drop(columns="_report")


def _user_sequence(group: pd.DataFrame) -> pd.DataFrame:
    """One user's validated rows -> one row: items/ratings in time order (ties: item index), exact duplicates
    across blocks dropped (counted), repeat consumption collapsed to the latest occurrence (counted)."""
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


def _merge_reports(reports: list[dict], duplicates: int, duplicate_samples: list[str],
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
                s.replace(f" line {_UNKNOWN_LINE}:", ":") for s in r["samples"].get(reason, [])[:room])
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


# ------------------------------------------------------------------------------------------------ preparation

def prepare_data_ray(config: Config, rating_range: tuple[float, float] = (0.0, 10.0)) -> Prepared:
    """Read, validate, de-duplicate and split a log on Ray Data (see the module docstring); the same
    `Prepared` as `raysparse.build.prepare_data` with the differences listed there (`log` arrays are empty:
    the raw log never comes to the driver; its vocabularies are set)."""
    dc = config.data
    interactions_path, items_path = find_dataset_inputs(dc.path, dc.items_path)
    with tempfile.TemporaryDirectory(prefix="raysparse-catalogue-") as tmp:
        catalogue = read_catalogue(_local_copy(items_path, tmp))
    raw = read_interaction_dataset(interactions_path)
    columns = raw.columns()
    for required in ("user_id", "item_id"):
        if required not in columns:
            found = [c for c in columns if c != "path"]
            raise DataError(f"{interactions_path}: the interaction log is missing required column {required!r}; "
                            f"found columns {found}. Rename the columns to the standard schema (or convert "
                            f"with `raysparse data convert`).")
    if "timestamp" not in columns:
        raise DataError(f"{interactions_path}: the Ray Data reader orders each user's interactions by timestamp, "
                        f"and this log has no timestamp column. Add one, or read it with the pandas path "
                        f"({READER_ENV}=pandas), which keeps file order.")
    catalogue_ref = ray.put(catalogue[["item_id"]])
    validated = raw.map_batches(_validate_block, batch_format="pyarrow", batch_size=65536,
                                fn_kwargs={"catalogue_ref": catalogue_ref, "rating_range": rating_range}).materialize()
    reports = [json.loads(r) for r in validated.map_batches(_select, batch_format="pandas",
                                                            fn_kwargs={"reports": True}).to_pandas()["_report"]]
    good = validated.map_batches(_select, batch_format="pandas", fn_kwargs={"reports": False})
    # Hash partitions for the shuffle: Ray's default of 200 is meant for big inputs; small ones take fewer.
    partitions = max(1, min(200, 2 * validated.num_blocks()))
    per_user = good.groupby("user_id", num_partitions=partitions).map_groups(_user_sequence, batch_format="pandas")

    user_ids: list[str] = []
    seqs: list[np.ndarray] = []
    rates: list[np.ndarray] = []
    duplicates = repeats = 0
    dup_samples: list[str] = []
    for batch in per_user.iter_batches(batch_format="pandas", batch_size=65536):
        user_ids.extend(batch["user_id"].tolist())
        seqs.extend(np.asarray(s, np.int64) for s in batch["items"])
        rates.extend(np.asarray(r, np.float32) for r in batch["ratings"])
        duplicates += int(batch["duplicates"].sum())
        repeats += int(batch["repeats"].sum())
        dup_samples.extend(s for s in batch["duplicate_sample"] if s)
    report = _merge_reports(reports, duplicates, dup_samples, dc.on_bad_rows, interactions_path)
    if not user_ids:
        raise DataError(f"{interactions_path}: no valid interaction rows are left after validation; "
                        f"{report.summary()}")

    # Users in sorted raw-id order; integer ids stay integers when every block had integer ids.
    as_int = all(r.get("user_id_int", False) for r in reports)
    keys = [int(u) for u in user_ids] if as_int else user_ids
    order = sorted(range(len(keys)), key=keys.__getitem__)
    users = Vocab([keys[i] for i in order], kind="user")
    seqs = [seqs[i] for i in order]
    rates = [rates[i] for i in order]
    has_rating = any(r.get("has_rating", False) for r in reports)
    split = split_sequences(seqs, rates if (dc.use_ratings and has_rating) else None, len(catalogue),
                            dc.cohort_fraction, list(dc.cohort_ks), dc.split_seed)
    split.stats["interactions"] = report.rows_used
    split.stats["repeat_interactions_collapsed"] = repeats
    items_vocab = Vocab(catalogue["item_id"].tolist(), kind="item")
    empty = np.zeros(0, np.int64)
    log = IndexedLog(user_idx=empty, item_idx=empty, timestamp=empty, rating=None, users=users, items=items_vocab)
    items = catalogue.reset_index(drop=True)
    out = report.to_dict()
    out["reader"] = "ray"
    return Prepared(log=log, split=split, items=items, item_texts=render_item_texts(items, dc.text_template),
                    report=out)


def split_sequences(sequences: list[np.ndarray], ratings: list[np.ndarray] | None, n_items: int,
                    cohort_fraction: float, cohort_ks: list[int], seed: int) -> Split:
    """The last-item protocol on per-user, time-ordered, de-duplicated item sequences: the same rules (and
    the same seeded cohort draw) as `raysparse.data.split.split_last_item` on an indexed log."""
    n_users = len(sequences)
    counts = np.array([len(s) for s in sequences], np.int64)
    items = np.concatenate(sequences) if n_users else np.zeros(0, np.int64)
    if ratings is not None:
        flat = np.concatenate(ratings).astype(np.float32)
        top = float(np.nanmax(flat)) if len(flat) else 1.0
        weights = np.nan_to_num(flat / (top or 1.0), nan=1.0).astype(np.float32)  # DMF: rating / max rating
    else:
        weights = np.ones(len(items), np.float32)
    return split_sorted_sequences(items, weights, counts, n_items, cohort_fraction, cohort_ks, seed)


def prepare_for_ray(config: Config) -> Prepared:
    """`prepare_data` on the path `choose_reader` picks."""
    if choose_reader(config) == "ray":
        return prepare_data_ray(config)
    from raysparse.build import prepare_data

    prepared = prepare_data(config)
    prepared.report = dict(prepared.report, reader="pandas")
    return prepared


# ------------------------------------------------------------------------------------------------ examples

def _expand_examples(batch: dict[str, np.ndarray], train_items_ref, mode: str, max_history: int
                     ) -> dict[str, np.ndarray]:
    """Rows (user_idx, start, length) -> one row per training example (user_idx, position, target), the
    examples of `BatchBuilder.training_examples(mode)`: prefix mode predicts position p >= 1 from the items
    before it; rest mode predicts any position of a user with >= 2 training items from the others; sequence
    mode names each window of max_history transitions by its last item (`is_example`)."""
    from raysparse.data.examples import is_example

    train_items = ray.get(train_items_ref) if isinstance(train_items_ref, ray.ObjectRef) else train_items_ref
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


def build_example_dataset(split: Split, mode: str = "prefix", num_blocks: int = 8,
                          progress_bars: bool = True, max_history: int = 50) -> "ray.data.Dataset":
    """Materialized Ray Dataset of training examples {user_idx, position, target} (see the module docstring).
    `num_blocks` blocks of users: enough to split into equal worker shards (`ray_train.training_dataset`
    asks for 4 per worker) and to build in parallel.
    progress_bars=False: this dataset (and those derived from it, such as each epoch's ingest: a Dataset keeps
    the DataContext it was created under) runs without progress bars. Its blocks keep the order of the users
    (preserve_order while it is materialized): by default Ray Data materializes blocks in the order their
    tasks finish, which varies from run to run, and so would the blocks each worker's shard gets (issue 16:
    two runs with one seed trained on different shards). Ray Train sets the ingest's own execution options;
    its equal split of the fixed block list is the same in every run (`ray_train.build_trainer`)."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars, context.execution_options.preserve_order
    context.enable_progress_bars = progress_bars and saved[0]
    context.execution_options.preserve_order = True
    try:
        return _example_dataset(split, mode, num_blocks, max_history)
    finally:
        context.enable_progress_bars, context.execution_options.preserve_order = saved


def _example_dataset(split: Split, mode: str, num_blocks: int, max_history: int) -> "ray.data.Dataset":
    lengths = np.diff(split.train_indptr).astype(np.int64)
    users = pd.DataFrame({"user_idx": np.arange(split.n_users, dtype=np.int64),
                          "start": split.train_indptr[:-1].astype(np.int64), "length": lengths})
    bounds = np.linspace(0, len(users), max(1, min(num_blocks, len(users))) + 1).astype(int)
    parts = [users.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    ref = ray.put(split.train_items)
    ds = ray.data.from_pandas(parts).map_batches(_expand_examples, batch_format="numpy",
                                                 fn_kwargs={"train_items_ref": ref, "mode": mode,
                                                            "max_history": max_history})
    return ds.materialize()


def fixed_block_order(ds: "ray.data.Dataset", seed: int) -> "ray.data.Dataset":
    """The blocks in one order drawn from `seed`, the same at every execution (= every epoch), so Ray Train's
    equal split gives each worker the same blocks every epoch; the epoch's order is `iter_example_batches`'.
    (An int seed is Ray's RandomSeedConfig(seed, reseed_after_execution=False).)"""
    return ds.randomize_block_order(seed=seed)


def iter_example_batches(shard, batch_size: int, seed: int, chunk_batches: int = 16
                         ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(user_idx, target, position) batches of a worker's shard (a Ray DataIterator). Ray Data hands over
    chunks of `chunk_batches` batches (its per-batch overhead paid once per chunk); each chunk is permuted
    with an rng seeded by `seed` (pass one per epoch and worker) and cut into batches. The shard's blocks come
    in the same order every epoch (`fixed_block_order`); examples were shuffled inside blocks at build time,
    and each epoch permutes each chunk anew, so the order depends on `seed` alone: a restored run redraws it.
    Yields ceil(rows / batch_size) batches, like one pass of the plain loop."""
    rng = np.random.default_rng(seed)
    for chunk in shard.iter_batches(batch_size=batch_size * chunk_batches, batch_format="numpy",
                                    prefetch_batches=1):
        order = rng.permutation(len(chunk["user_idx"]))
        # Fancy indexing copies: Ray's arrays are read-only views, and torch.from_numpy warns on those.
        users, targets, positions = (np.asarray(chunk[k])[order] for k in ("user_idx", "target", "position"))
        for start in range(0, len(order), batch_size):
            end = start + batch_size
            yield users[start:end], targets[start:end], positions[start:end]
