"""Ray Data side of training: read + validate large interaction logs on Ray Data, and the training-example
dataset that each Ray Train worker iterates. Only what calls Ray lives here: the per-block steps it maps are
Ray-free functions of `raysparse.data.blocks`, file listing and the choice of reader `raysparse.data.sources`
(pandas for small local logs, Ray Data for URIs and logs of 256 MiB or more; see its docstring).

The Ray Data path, step by step (the raw log never comes to the driver):
  1. `ray.data.read_parquet|read_csv|read_json` over the interaction files (`include_paths=True`).
  2. `map_batches(blocks.validate_block)`: the core's row rules (`raysparse.data.io.validate_interactions`:
     ids, ratings, timestamps, catalogue membership, duplicates within the block) per block; good rows come
     out with dense item indices, plus one "report row" per block carrying that block's counts and samples
     (a side output; the validated dataset is materialized, so it is computed once).
  3. `groupby("user_id").map_groups(blocks.user_sequence)`: the rules that need global state are per user, so
     a group holds all a rule needs: exact duplicates across blocks (a duplicate has the same user), time
     order, and repeat consumption (keep the latest (user, item), as `split_last_item` does).
  4. The driver collects one compact row per user (int item indices, float ratings) and builds the `Split`
     (`raysparse.data.split.split_sequences`): the last-item hold-out and the seeded sparse cohort, with the
     same rules as the core's `split_last_item`. The driver holds the training CSR (about 12 bytes per
     interaction), which every worker needs anyway.
Differences from the pandas path, by design: users are indexed in sorted raw-id order (Ray Data has no
global file order), timestamp ties break by item index instead of file order, so a timestamp column is
required; samples in messages name the file and the values but not the line; quarantine mode reports counts
and samples but writes no quarantine.csv.

Training examples, both paths (`build_example_dataset`): one row per user (user_idx, start, length) becomes
rows {user_idx, position, target} with `map_batches(blocks.expand_examples)`, exactly the examples of the
core's `BatchBuilder.training_examples`, shuffled inside each block. The dataset is materialized once, its
blocks put in one seeded order (`fixed_block_order`), and Ray Train splits it into one equal shard per worker
(`ray.train.get_dataset_shard("train")`): the same blocks reach the same worker in the same order every epoch.
Each epoch's order is drawn by the worker (`iter_example_batches`, seeded by seed, epoch and rank), so it is a
function of the epoch alone and a restored run draws what the uninterrupted run drew (issue 16). A reseeding
`randomize_block_order` would not be: its seed counts the dataset's executions, which restart at 0 in the
fresh dataset of a resumed run and move with whatever else ran in the driver's process.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import ray

from raysparse.build import Prepared, prepare_data
from raysparse.config import Config
from raysparse.data.blocks import expand_examples, merge_reports, report_rows, user_sequence, validate_block
from raysparse.data.dataset import IndexedLog
from raysparse.data.io import FORMATS, read_catalogue
from raysparse.data.sources import (READER_ENV, choose_reader, csv_columns, find_dataset_inputs, list_data_files,
                                    local_copy)
from raysparse.data.split import Split, split_sequences
from raysparse.data.text import render_catalogue_texts
from raysparse.data.vocab import Vocab
from raysparse.errors import DataError


def _fetched(value):
    """A value passed to a mapped function through the object store: Ray Data may hand over the ObjectRef."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


# ------------------------------------------------------------------------------------------------ reading

def read_interaction_dataset(path: str) -> "ray.data.Dataset":
    """The raw interaction log as a Ray Dataset with a `path` column (which file each row came from).

    CSV columns are read as text (pyarrow infers a CSV column's type from its first block, and a later bad
    value would fail the whole read); the core's parsers turn them into ids, floats and timestamps, so a bad
    value becomes a reported row instead.
    """
    files = list_data_files(path)
    kind = FORMATS[Path(files[0]).suffix.lower()]
    if kind == "parquet":
        return ray.data.read_parquet(files, include_paths=True)
    if kind == "csv":
        convert = pa_csv.ConvertOptions(strings_can_be_null=True,
                                        column_types={c: pa.string() for c in csv_columns(files[0])})
        parse = pa_csv.ParseOptions(ignore_empty_lines=False)
        return ray.data.read_csv(files, include_paths=True, convert_options=convert, parse_options=parse)
    return ray.data.read_json(files, include_paths=True, lines=True)


def _validate_block(batch: pa.Table, catalogue_ref, rating_range: tuple[float, float]) -> pd.DataFrame:
    return validate_block(batch, _fetched(catalogue_ref), rating_range)


# ------------------------------------------------------------------------------------------------ preparation

def prepare_data_ray(config: Config, rating_range: tuple[float, float] = (0.0, 10.0)) -> Prepared:
    """Read, validate, de-duplicate and split a log on Ray Data (see the module docstring); the same
    `Prepared` as `raysparse.build.prepare_data` with the differences listed there (`log` arrays are empty:
    the raw log never comes to the driver; its vocabularies are set)."""
    dc = config.data
    interactions_path, items_path = find_dataset_inputs(dc.path, dc.items_path)
    with tempfile.TemporaryDirectory(prefix="raysparse-catalogue-") as tmp:
        catalogue = read_catalogue(local_copy(items_path, tmp))
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
    reports = [json.loads(r) for r in validated.map_batches(report_rows, batch_format="pandas",
                                                            fn_kwargs={"reports": True}).to_pandas()["_report"]]
    good = validated.map_batches(report_rows, batch_format="pandas", fn_kwargs={"reports": False})
    # Hash partitions for the shuffle: Ray's default of 200 is meant for big inputs; small ones take fewer.
    partitions = max(1, min(200, 2 * validated.num_blocks()))
    per_user = good.groupby("user_id", num_partitions=partitions).map_groups(user_sequence, batch_format="pandas")

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
    report = merge_reports(reports, duplicates, dup_samples, dc.on_bad_rows, interactions_path)
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
    texts, note = render_catalogue_texts(items, dc.text_template)
    return Prepared(log=log, split=split, items=items, item_texts=texts, report=out, item_text_note=note)


def prepare_for_ray(config: Config) -> Prepared:
    """`prepare_data` on the path `choose_reader` picks."""
    if choose_reader(config.data.path) == "ray":
        return prepare_data_ray(config)
    prepared = prepare_data(config)
    prepared.report = dict(prepared.report, reader="pandas")
    return prepared


# ------------------------------------------------------------------------------------------------ examples

def _expand_examples(batch: dict[str, np.ndarray], train_items_ref, mode: str, max_history: int
                     ) -> dict[str, np.ndarray]:
    return expand_examples(batch, _fetched(train_items_ref), mode, max_history)


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
