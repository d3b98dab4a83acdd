"""Read interaction logs and item catalogues in the standard schema, and validate them row by row.

Standard schema
  interactions: `user_id`, `item_id` (integer ids stay int64, any other id becomes str), optional `rating`
                (float) and optional `timestamp` (int64 seconds since the epoch; ints, floats and ISO-8601
                strings are accepted and converted).
  items:        `item_id` plus any text columns (`title`, `genres`, `tags`, `description`, ...).

A dataset directory holds `interactions.<ext>` (or a folder `interactions/` of files) and `items.<ext>` (or
`items/`), ext in parquet, csv, jsonl. Every reader takes one file or a folder of files of one format.

Validation never drops a row silently: every row read is either used or counted under a reason, and
`rows_in == rows_used + rows_quarantined` holds for every report. With `on_bad_rows="fail"` (the default)
any bad row stops the read with a message naming file, line, count and a sample per reason; with
`"quarantine"` bad rows are set aside (written to `<quarantine_dir>/quarantine.csv` when a folder is given)
and the rest is used.

Everything on the good path is vectorized (pandas / pyarrow / numpy): `raysparse bench data` checks the
goal of >= 1M interactions/s for read + validate + split.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from raysparse.errors import ConfigError, DataError

REQUIRED_COLUMNS = ("user_id", "item_id")
OPTIONAL_COLUMNS = ("rating", "timestamp")
FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
ON_BAD_ROWS = ("fail", "quarantine")
QUARANTINE_FILE = "quarantine.csv"
MAX_SAMPLES = 5
FIX_HINT = "fix the rows or pass --on-bad-rows quarantine to set them aside and continue"

# Reasons in priority order: a row with several problems is counted once, under the first that applies.
REASONS = (
    "null user_id", "unparsable user_id",
    "null item_id", "unparsable item_id",
    "null rating", "non-numeric rating", "rating out of range",
    "null timestamp", "bad timestamp",
    "item not in catalogue",
    "duplicate row",
)


@dataclass
class ValidationReport:
    """What validation did with the rows of one read. Invariant: rows_in == rows_used + rows_quarantined."""

    rows_in: int
    rows_used: int
    rows_quarantined: int
    problems: dict[str, int] = field(default_factory=dict)       # reason -> rows, in REASONS order
    samples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to 5 "file line N: col=value ..."
    quarantine_path: str | None = None                           # quarantine.csv written, or None

    def __post_init__(self) -> None:
        assert self.rows_in == self.rows_used + self.rows_quarantined, (
            f"report does not add up: {self.rows_in} in != {self.rows_used} used + {self.rows_quarantined} set aside")
        assert sum(self.problems.values()) == self.rows_quarantined, (self.problems, self.rows_quarantined)

    @property
    def clean(self) -> bool:
        return self.rows_quarantined == 0

    def summary(self) -> str:
        """Multi-line text for people: counts, then each reason with its count and samples."""
        lines = [f"rows in:          {self.rows_in:,}",
                 f"rows used:        {self.rows_used:,}",
                 f"rows quarantined: {self.rows_quarantined:,}"]
        for reason, count in self.problems.items():
            lines.append(f"  {reason}: {count:,}")
            lines.extend(f"    {sample}" for sample in self.samples.get(reason, []))
        if self.quarantine_path:
            lines.append(f"quarantine file:  {self.quarantine_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_used": self.rows_used, "rows_quarantined": self.rows_quarantined,
                "problems": dict(self.problems), "samples": {k: list(v) for k, v in self.samples.items()},
                "quarantine_path": self.quarantine_path}


# ----------------------------------------------------------------------------------------------- files

def _dataset_entry(folder: Path, stem: str) -> Path | None:
    """`<stem>.<ext>` or `<stem>/` inside a dataset folder; None if absent; DataError if ambiguous."""
    found = [folder / f"{stem}{ext}" for ext in FORMATS if (folder / f"{stem}{ext}").is_file()]
    if (folder / stem).is_dir():
        found.append(folder / stem)
    if len(found) > 1:
        raise DataError(f"{folder}: found several {stem} inputs ({', '.join(p.name for p in found)}); "
                        f"keep exactly one of {stem}.parquet, {stem}.csv, {stem}.jsonl or {stem}/.")
    return found[0] if found else None


def find_dataset_files(path: str) -> tuple[str, str | None]:
    """Locate the inputs of a dataset.

    A file -> (file, None). A dataset folder (holding `interactions.*` or `interactions/`) -> (interactions
    path, items path or None). Any other folder is taken as a folder of interaction files -> (folder, None).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset path {path!r} does not exist; pass a dataset folder (interactions.* + items.*), "
                        f"an interactions file (.parquet, .csv, .jsonl) or a folder of such files.")
    if p.is_file():
        return str(p), None
    interactions = _dataset_entry(p, "interactions")
    items = _dataset_entry(p, "items")
    if interactions is None:
        if items is not None:
            raise DataError(f"{path}: has {items.name} but no interactions.parquet/.csv/.jsonl or interactions/; "
                            f"add the interaction log beside the catalogue.")
        return str(p), None
    return str(interactions), (str(items) if items is not None else None)


def _list_files(path: str) -> list[Path]:
    """The files a path names: itself, or the visible files of a folder sorted by name, all one format."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path!r} does not exist; pass a .parquet, .csv or .jsonl file or a folder of them.")
    if p.is_file():
        files = [p]
    else:
        # Hidden and underscore files are bookkeeping of other writers (Spark's _SUCCESS, .crc files).
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith((".", "_")))
        if not files:
            raise DataError(f"{path}: folder has no data files; put .parquet, .csv or .jsonl files in it.")
    kinds = {FORMATS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in FORMATS)
        raise DataError(f"{bad}: unknown file format {bad.suffix!r}; use one of {', '.join(FORMATS)}.")
    if len(kinds) > 1:
        raise DataError(f"{path}: folder mixes formats ({', '.join(sorted(kinds))}); keep one format per folder.")
    return files


def _csv_table(path: Path, newlines_in_values: bool) -> pa.Table:
    parse = pa_csv.ParseOptions(newlines_in_values=newlines_in_values,
                                # Keep blank lines as all-null rows: line numbers stay exact and a blank line
                                # is reported (as a null id) instead of vanishing.
                                ignore_empty_lines=False)
    forced: dict[str, pa.DataType] = {}
    while True:
        convert = pa_csv.ConvertOptions(strings_can_be_null=True, column_types=forced)
        try:
            return pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as err:
            # pyarrow infers a column's type from the first block; a later value that does not fit
            # ("abc" in an integer column) fails the read. Re-read that column as text so validation
            # can report the row instead.
            match = re.search(r"In CSV column #(\d+)", str(err))
            if match is None:
                raise DataError(f"{path}: cannot parse as CSV ({err}); every row needs as many fields as the "
                                f"header, fields with commas or newlines must be quoted, and the file must be "
                                f"UTF-8.") from None
            names = _csv_header(path)
            name = names[int(match.group(1))]
            if name in forced:
                raise DataError(f"{path}: cannot read column {name!r} ({err}); the file must be UTF-8 "
                                f"text.") from None
            forced[name] = pa.string()


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return next(csv.reader(f), [])


def _blank_line_numbers(path: Path) -> np.ndarray:
    """1-based numbers of the non-blank lines of a text file (pyarrow's and pandas' JSON readers skip
    blank lines; this maps their rows back to file lines). Vectorized over the bytes."""
    buf = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if len(buf) == 0:
        return np.zeros(0, dtype=np.int64)
    newlines = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    solid = ~np.isin(buf, np.frombuffer(b" \t\r\n", dtype=np.uint8))
    solid_before = np.concatenate(([0], np.cumsum(solid)))
    has_content = solid_before[ends] - solid_before[starts] > 0
    return np.flatnonzero(has_content).astype(np.int64) + 1


def _jsonl_frame(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows, their 1-based line numbers)."""
    lines = _blank_line_numbers(path)
    try:
        frame = arrow_to_pandas(pa_json.read_json(path))
    except pa.ArrowInvalid:
        # pyarrow needs one type per column; a column mixing 1 and "a" needs the slower pandas reader,
        # which keeps each value's own type (object column) for validation to sort out.
        try:
            frame = pd.read_json(path, lines=True, dtype=False)  # dtype=False: no type or date guessing
        except ValueError as pandas_err:
            for number, text in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n"), 1):
                if text.strip():
                    try:
                        value = json.loads(text)
                    except ValueError as err:
                        raise DataError(f"{path.name} line {number}: not valid JSON ({err}); each line of a .jsonl "
                                        f"file must be one JSON object.") from None
                    if not isinstance(value, dict):
                        raise DataError(f"{path.name} line {number}: expected a JSON object, got "
                                        f"{type(value).__name__}; each line must look like "
                                        f'{{"user_id": ..., "item_id": ...}}.') from None
            raise DataError(f"{path}: cannot read as JSON lines ({pandas_err}); write one JSON object per "
                            f"line.") from None
    if len(frame) != len(lines):
        # Should not happen; fall back to row numbers rather than wrong line numbers.
        lines = np.arange(1, len(frame) + 1, dtype=np.int64)
    return frame, lines


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas, keeping integer columns with gaps as nullable Int64 rather than float64, so an id
    column with one empty cell stays exact and samples show `item_id=5`, not `5.0`."""
    frame = table.to_pandas()
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_integer(column.type) and column.null_count:
            frame[name] = column.to_pandas(types_mapper=lambda t: pd.Int64Dtype() if pa.types.is_integer(t) else None)
    return frame


def _read_one(path: Path, newlines_in_values: bool) -> pd.DataFrame:
    kind = FORMATS[path.suffix.lower()]
    if kind == "parquet":
        try:
            frame = arrow_to_pandas(pq.read_table(path))
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot read as parquet ({err}); check the file is complete.") from None
        lines = np.arange(1, len(frame) + 1, dtype=np.int64)
    elif kind == "csv":
        table = _csv_table(path, newlines_in_values)
        binary = [f.name for f in table.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        if binary:  # pyarrow falls back to bytes for text that is not UTF-8
            raise DataError(f"{path}: column(s) {binary} are not valid UTF-8 text; re-save the file as UTF-8 "
                            f"(MovieLens 100k/1M files are latin-1: convert them with `raysparse data convert`).")
        frame = arrow_to_pandas(table)
        lines = np.arange(2, len(frame) + 2, dtype=np.int64)  # line 1 is the header
    else:
        frame, lines = _jsonl_frame(path)
    frame["_line"] = lines
    return frame


def _read_files(path: str, newlines_in_values: bool = False) -> list[tuple[str, pd.DataFrame]]:
    """[(file name, frame with `_line`)] for each file the path names, in order."""
    return [(f.name, _read_one(f, newlines_in_values)) for f in _list_files(path)]


def _concat(parts: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    names = [name for name, _ in parts]
    frames = [frame for _, frame in parts]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True, sort=False)
    codes = np.repeat(np.arange(len(frames), dtype=np.int32), [len(f) for f in frames])
    frame["_source"] = pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype=object))
    return frame


def read_table(path: str, *, newlines_in_values: bool = False) -> pd.DataFrame:
    """One file or a folder of files (sorted by name, one format) as one frame, in file order.

    Adds `_source` (file name, categorical) and `_line` (1-based line in that file: for CSV the header is
    line 1, so the first data row is line 2 -- exact unless a quoted field spans lines; for parquet and
    JSONL the row number from 1; JSONL blank lines are counted). Values keep the types the reader infers;
    in CSV, empty cells and markers such as NA, NULL, null, NaN read as missing.
    `newlines_in_values`: allow quoted CSV fields with newlines (slower; used for catalogues).
    """
    return _concat(_read_files(path, newlines_in_values))


# ----------------------------------------------------------------------------------------------- parsing

def _int_like_floats(values: np.ndarray) -> np.ndarray:
    """Mask of finite, whole floats that fit int64."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.floor(values) == values) & (np.abs(values) < 2.0 ** 63)


def _blank_strings(col: pd.Series) -> np.ndarray:
    """Mask of null, empty or whitespace-only values of a str column (pyarrow kernels: no Python objects)."""
    arr = pa.array(col)
    blank = pc.or_kleene(pc.equal(pc.binary_length(arr), 0), pc.utf8_is_space(arr))
    return np.asarray(pc.fill_null(blank, True).to_numpy(zero_copy_only=False), dtype=bool)


def _parse_ids(col: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Normalize an id column. Returns (ids, null mask, unparsable mask); ids are int64 when the column is
    integral (floats that are whole numbers count: a CSV int column with a gap reads as float), else str.
    Values under the masks are placeholders."""
    n = len(col)
    dtype = col.dtype
    if isinstance(dtype, pd.CategoricalDtype):  # dictionary-encoded parquet: parse the categories once
        cats, cat_null, cat_bad = _parse_ids(pd.Series(dtype.categories))
        codes = col.cat.codes.to_numpy()
        safe = np.where(codes < 0, 0, codes)
        null = (codes < 0) | (cat_null[safe] if len(cats) else True)
        bad = cat_bad[safe] & ~null if len(cats) else np.zeros(n, bool)
        values = cats.take(safe) if len(cats) else pd.Series(np.zeros(n, np.int64))
        return values.reset_index(drop=True), np.asarray(null, bool), np.asarray(bad, bool)
    if dtype.kind in "iu" and not isinstance(dtype, pd.api.extensions.ExtensionDtype):
        return col.astype(np.int64).reset_index(drop=True), np.zeros(n, bool), np.zeros(n, bool)
    if dtype.kind in "iuf":  # numpy floats, nullable Int64 / Float64
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        null = np.isnan(values)
        ok = _int_like_floats(values)
        bad = ~null & ~ok
        if dtype.kind in "iu":  # nullable ints: exact, no float round trip
            ints = col.fillna(0).to_numpy(dtype=np.int64)
        else:
            ints = np.where(ok, values, 0).astype(np.int64)
        return pd.Series(ints), null, bad
    if isinstance(dtype, pd.StringDtype):
        return col.reset_index(drop=True), _blank_strings(col), np.zeros(n, bool)
    if dtype == object:
        kind = pd.api.types.infer_dtype(col, skipna=True)
        if kind in ("string", "empty"):
            return _parse_ids(col.astype("str"))
        if kind == "integer":
            return _parse_ids(col.astype("Int64"))
        # Mixed types (JSON with 1 and "a" in one column): ids become strings; per value, but only on this
        # unusual path.
        out, null, bad = [], np.zeros(n, bool), np.zeros(n, bool)
        for i, v in enumerate(col.tolist()):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                null[i] = True
                out.append("")
            elif isinstance(v, str):
                null[i] = not v.strip()
                out.append(v)
            elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
                out.append(str(int(v)))
            elif isinstance(v, (float, np.floating)) and _int_like_floats(np.array([v]))[0]:
                out.append(str(int(v)))
            else:
                bad[i] = True
                out.append("")
        return pd.Series(out, dtype="str"), null, bad
    # bool, datetime, lists, ...: not ids.
    null = col.isna().to_numpy()
    return pd.Series(np.zeros(n, np.int64)), null, ~null


def _numeric(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 values, null mask, non-numeric mask) for a rating/timestamp column."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(col.cat.categories.dtype if col.cat.categories.dtype.kind in "iufO" else "str")
    if col.dtype.kind in "iuf":
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.isnan(values), np.zeros(len(col), bool)
    null = col.isna().to_numpy()
    if col.dtype.kind == "b":
        return np.zeros(len(col)), null, ~null
    if isinstance(col.dtype, pd.StringDtype) or col.dtype == object:
        if col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) == "boolean":
            return np.zeros(len(col)), null, ~null
        text = col.astype("str")
        null = null | (text.str.strip() == "").to_numpy(dtype=bool, na_value=True)
        values = pd.to_numeric(text.where(~null), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        return values, null, ~null & np.isnan(values)
    return np.zeros(len(col)), null, ~null


def _parse_ratings(col: pd.Series, rating_range: tuple[float, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    values, null, non_numeric = _numeric(col)
    lo, hi = rating_range
    with np.errstate(invalid="ignore"):
        out_of_range = ~null & ~non_numeric & ~(np.isfinite(values) & (values >= lo) & (values <= hi))
    return values, {"null rating": null, "non-numeric rating": non_numeric, "rating out of range": out_of_range}


def _parse_timestamps(col: pd.Series) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """int64 seconds since the epoch from ints, floats (truncated), datetimes or ISO-8601 strings (naive
    ones are UTC). Negative or unparsable values are bad."""
    n = len(col)
    if col.dtype.kind in "iu" and not isinstance(col.dtype, pd.api.extensions.ExtensionDtype):
        values = col.to_numpy(dtype=np.int64)
        return values, {"null timestamp": np.zeros(n, bool), "bad timestamp": values < 0}
    if col.dtype.kind == "M":  # pyarrow infers timestamp columns from ISO strings in CSV / JSON
        null = col.isna().to_numpy()
        if getattr(col.dtype, "tz", None) is not None:
            col = col.dt.tz_convert("UTC").dt.tz_localize(None)
        secs = col.to_numpy(dtype="datetime64[s]").astype(np.int64)
        secs = np.where(null, 0, secs)
        return secs, {"null timestamp": null, "bad timestamp": ~null & (secs < 0)}
    values, null, non_numeric = _numeric(col)
    values, non_numeric = values.copy(), non_numeric.copy()  # may be read-only views of the column
    if non_numeric.any() and col.dtype.kind != "b":
        text = col[non_numeric].astype("str")
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        ok = parsed.notna().to_numpy()
        idx = np.flatnonzero(non_numeric)
        secs = parsed[ok].dt.tz_localize(None).to_numpy(dtype="datetime64[s]").astype(np.int64)
        values[idx[ok]] = secs
        non_numeric[idx[ok]] = False
    with np.errstate(invalid="ignore"):
        bad = non_numeric | (~null & ~(np.isfinite(values) & (values >= 0) & (values < 2.0 ** 62)))
    ints = np.where(null | bad, 0, values).astype(np.int64)  # floats truncate toward zero (all >= 0 here)
    return ints, {"null timestamp": null, "bad timestamp": bad}


def _fmt_value(v: object) -> str:
    if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return "None"
    return str(v)


def _sample_text(frame: pd.DataFrame, i: int, columns: list[str]) -> str:
    row = frame.iloc[i]
    values = " ".join(f"{c}={_fmt_value(row[c])}" for c in columns)
    return f"{row['_source']} line {int(row['_line'])}: {values}"


def _check_columns(name: str, columns: list[str], required: tuple[str, ...], what: str, hint: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        found = [c for c in columns if c not in ("_line", "_source")]
        raise DataError(f"{name}: {what} is missing required column(s) {', '.join(missing)}; found columns "
                        f"{found}; required: {', '.join(required)}{hint}. Rename the columns to the standard "
                        f"schema (or convert with `raysparse data convert`).")


# ----------------------------------------------------------------------------------------------- catalogue

def _text_column(col: pd.Series) -> pd.Series:
    """Any catalogue column as str, NaN -> "", lists joined by ", " (parquet list columns of tags)."""
    if col.dtype.kind == "f":
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        if _int_like_floats(values[~np.isnan(values)]).all():  # a year column with gaps reads as float
            col = col.astype("Int64")
    if col.dtype == object:
        col = col.map(lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple, np.ndarray)) else v)
    return col.astype("str").fillna("").reset_index(drop=True).astype("str")


def read_catalogue(path: str) -> pd.DataFrame:
    """Item catalogue from a file or folder: `item_id` (int64 or str) + every other column as text.

    Raises DataError naming the file, the count and a sample when `item_id` is missing, null, unparsable
    or repeated. Text columns come back as str with missing values as "" (lists joined by ", ").
    Returns a frame (n_items, 1 + text columns) in file order.
    """
    frame = read_table(path, newlines_in_values=True)
    _check_columns(path, list(frame.columns), ("item_id",), "the item catalogue",
                   " (+ text columns such as title, genres, tags, description)")
    if len(frame) == 0:
        raise DataError(f"{path}: the item catalogue has no rows; add one row per item (item_id + text).")
    ids, null, bad = _parse_ids(frame["item_id"])
    invalid = null | bad
    if invalid.any():
        first = int(np.flatnonzero(invalid)[0])
        raise DataError(f"{path}: {int(invalid.sum())} catalogue row(s) have a null or unparsable item_id, e.g. "
                        f"{_sample_text(frame, first, ['item_id'])}; every catalogue row needs an item_id, "
                        f"fix or remove those rows.")
    dup = ids.duplicated(keep="first").to_numpy()
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        original = int(np.flatnonzero((ids == ids.iloc[first]).to_numpy())[0])
        raise DataError(f"{path}: {int(dup.sum())} catalogue row(s) repeat an item_id, e.g. "
                        f"{_sample_text(frame, first, ['item_id'])} repeats "
                        f"{frame['_source'].iloc[original]} line {int(frame['_line'].iloc[original])}; item ids "
                        f"must be unique, merge or remove the repeats.")
    out = {"item_id": ids}
    for name in frame.columns:
        if name not in ("item_id", "_source", "_line"):
            out[name] = _text_column(frame[name])
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------- interactions

def _catalogue_positions(ids: pd.Series, catalogue_ids: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """(position of each id in the catalogue, -1 where absent; the ids in the catalogue's type).

    An int log against a str catalogue (or the other way round) is matched as text, and the log's ids take
    the catalogue's type. One hash lookup (pyarrow index_in) gives both membership and a dense item code.
    """
    cat_int = catalogue_ids.dtype.kind in "iu"
    ids_int = ids.dtype.kind in "iu"
    keys, cat_keys = (ids, catalogue_ids) if cat_int == ids_int else (ids.astype("str"), catalogue_ids.astype("str"))
    key_arr = pa.array(keys)
    value_set = pa.array(cat_keys)
    if isinstance(value_set, pa.ChunkedArray):
        value_set = value_set.combine_chunks()
    value_set = value_set.cast(key_arr.type)
    positions = pc.fill_null(pc.index_in(key_arr, value_set=value_set), -1)
    positions = np.asarray(positions.to_numpy() if isinstance(positions, pa.Array)
                           else positions.to_numpy(), dtype=np.int64)
    found = positions >= 0
    if cat_int and not ids_int:
        return positions, pd.Series(catalogue_ids.to_numpy(dtype=np.int64)[np.where(found, positions, 0)])
    return positions, keys.reset_index(drop=True)


def _duplicate_rows(parsed: pd.DataFrame, item_codes: np.ndarray | None = None) -> np.ndarray:
    """Mask of rows equal in every column to an earlier row.

    `DataFrame.duplicated` hashes every column (seconds at 10M rows); exact duplicates must share
    (user, item), so sort one int64 (user, item) key (numpy's sort is fast) and hash whole rows only for
    pairs that occur more than once. `item_codes`: dense item codes if already known (catalogue positions).
    """
    n = len(parsed)
    user_codes = pd.factorize(parsed["user_id"])[0].astype(np.int64)
    if item_codes is None:
        item_codes = pd.factorize(parsed["item_id"])[0]
    key = user_codes * (int(item_codes.max(initial=0)) + 1) + item_codes
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    out = np.zeros(n, dtype=bool)
    if len(repeated):
        rows = np.flatnonzero(np.isin(key, repeated))
        out[rows] = parsed.iloc[rows].duplicated(keep="first").to_numpy()
    return out


def validate_interactions(frame: pd.DataFrame, name: str, *, catalogue: pd.DataFrame | None = None,
                          on_bad_rows: str = "fail", quarantine_dir: str | None = None,
                          rating_range: tuple[float, float] = (0.0, 10.0)) -> tuple[pd.DataFrame, ValidationReport]:
    """Validate a raw log (as from `read_table`: with `_source`, `_line`) and return the good rows.

    `name` is the input as the user gave it (used in messages). Rules: ids non-null and parsable; ratings
    numeric, finite and within `rating_range` (default 0 <= rating <= 10); timestamps parsable and >= 0;
    items in `catalogue` when given; exact duplicates (all standard columns equal after parsing) keep the
    first occurrence. Returns (E_used, 2-4) frame user_id, item_id[, rating float32][, timestamp int64]
    in input order, and the report.
    """
    if on_bad_rows not in ON_BAD_ROWS:
        raise ConfigError(f"on_bad_rows={on_bad_rows!r} is not allowed; choose 'fail' (stop on bad rows) or "
                          f"'quarantine' (set them aside and continue).")
    _check_columns(name, list(frame.columns), REQUIRED_COLUMNS, "the interaction log",
                   " (optional: rating, timestamp)")
    n = len(frame)
    masks: dict[str, np.ndarray] = {}
    user_ids, masks["null user_id"], masks["unparsable user_id"] = _parse_ids(frame["user_id"])
    item_ids, masks["null item_id"], masks["unparsable item_id"] = _parse_ids(frame["item_id"])
    out = {}
    if "rating" in frame.columns:
        ratings, rating_masks = _parse_ratings(frame["rating"], rating_range)
        masks.update(rating_masks)
    if "timestamp" in frame.columns:
        timestamps, ts_masks = _parse_timestamps(frame["timestamp"])
        masks.update(ts_masks)

    # Reason code per row: 0 = good, k = REASONS[k - 1]; the first applicable reason wins.
    code = np.zeros(n, dtype=np.int8)
    for k, reason in enumerate(REASONS, 1):
        if reason in masks:
            code[(code == 0) & masks[reason]] = k
    item_codes = None
    if catalogue is not None:
        item_codes, item_ids = _catalogue_positions(item_ids, catalogue["item_id"])
        code[(code == 0) & (item_codes < 0)] = REASONS.index("item not in catalogue") + 1
    out["user_id"] = user_ids
    out["item_id"] = item_ids
    if "rating" in frame.columns:
        out["rating"] = ratings.astype(np.float32)
    if "timestamp" in frame.columns:
        out["timestamp"] = timestamps
    parsed = pd.DataFrame(out)
    # Duplicates among rows that are otherwise fine (placeholders under the masks must not match real rows).
    good = np.flatnonzero(code == 0)
    if len(good) < n:
        dup = _duplicate_rows(parsed.iloc[good], None if item_codes is None else item_codes[good])
    else:
        dup = _duplicate_rows(parsed, item_codes)
    code[good[dup]] = REASONS.index("duplicate row") + 1

    bad = code > 0
    n_bad = int(bad.sum())
    problems: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    if n_bad:
        counts = np.bincount(code, minlength=len(REASONS) + 1)
        original = [c for c in frame.columns if c not in ("_source", "_line")]
        for k, reason in enumerate(REASONS, 1):
            if counts[k]:
                problems[reason] = int(counts[k])
                rows = np.flatnonzero(code == k)[:MAX_SAMPLES]
                samples[reason] = [_sample_text(frame, int(i), original) for i in rows]
        if on_bad_rows == "fail":
            parts = "; ".join(f"{reason}: {count} row(s), e.g. {samples[reason][0]}"
                              for reason, count in problems.items())
            raise DataError(f"{name}: {n_bad} of {n} interaction rows are invalid -- {parts}. To continue, "
                            f"{FIX_HINT}.")
    quarantine_path = None
    if on_bad_rows == "quarantine" and quarantine_dir is not None:
        # Written even when empty, so a stale file from an earlier run never describes this one.
        os.makedirs(quarantine_dir, exist_ok=True)
        quarantine_path = os.path.join(quarantine_dir, QUARANTINE_FILE)
        rows = frame.iloc[np.flatnonzero(bad)]
        table = pd.DataFrame({"source": rows["_source"].astype(str).to_numpy(), "line": rows["_line"].to_numpy(),
                              "reason": np.array(("",) + REASONS, dtype=object)[code[bad]]})
        for c in frame.columns:
            if c not in ("_source", "_line"):
                table[c] = rows[c].reset_index(drop=True)
        table.to_csv(quarantine_path, index=False)
    result = parsed if n_bad == 0 else parsed.iloc[np.flatnonzero(~bad)].reset_index(drop=True)
    report = ValidationReport(rows_in=n, rows_used=len(result), rows_quarantined=n_bad, problems=problems,
                              samples=samples, quarantine_path=quarantine_path)
    assert report.rows_in == report.rows_used + report.rows_quarantined
    return result, report


def read_interactions(path: str, *, catalogue: pd.DataFrame | None = None, on_bad_rows: str = "fail",
                      quarantine_dir: str | None = None,
                      rating_range: tuple[float, float] = (0.0, 10.0)) -> tuple[pd.DataFrame, ValidationReport]:
    """Read and validate an interaction log (one file or a folder of files).

    Ratings must be finite with `rating_range[0] <= rating <= rating_range[1]` (default 0..10).
    on_bad_rows: "fail" raises DataError naming file, line, count and a sample per reason; "quarantine"
    drops bad rows from the result, counts them in the report and, when `quarantine_dir` is given,
    writes them to `<quarantine_dir>/quarantine.csv` (source, line, reason, original values).
    Returns ((E, 2-4) frame user_id, item_id[, rating float32][, timestamp int64] in file order, report).
    """
    parts = _read_files(path)
    for file_name, part in parts:  # check each file: a folder's files may disagree on columns
        _check_columns(file_name if len(parts) > 1 else path, list(part.columns), REQUIRED_COLUMNS,
                       "the interaction log", " (optional: rating, timestamp)")
    frame = _concat(parts)
    del parts
    if len(frame) == 0:
        raise DataError(f"{path}: the interaction log has no rows; it needs one row per interaction "
                        f"(user_id, item_id[, rating][, timestamp]).")
    return validate_interactions(frame, path, catalogue=catalogue, on_bad_rows=on_bad_rows,
                                 quarantine_dir=quarantine_dir, rating_range=rating_range)


def load_dataset(path: str, items_path: str = "", *, on_bad_rows: str = "fail", quarantine_dir: str | None = None,
                 rating_range: tuple[float, float] = (0.0, 10.0)) -> tuple[pd.DataFrame, pd.DataFrame, ValidationReport]:
    """(interactions, items, report) of a dataset folder or an interactions path plus `items_path`.

    The catalogue is required: every interaction is checked against it. Item ids of the log take the
    catalogue's type (int64 or str).
    """
    interactions_path, found_items = find_dataset_files(path)
    items = items_path or found_items
    if not items:
        raise DataError(f"{path}: no item catalogue found; put items.parquet, items.csv or items.jsonl beside the "
                        f"interactions (what `raysparse bench` reads), or name it: --set data.items_path=PATH "
                        f"(train, tune, the jobs), --items PATH (data check).")
    catalogue = read_catalogue(items)
    interactions, report = read_interactions(interactions_path, catalogue=catalogue, on_bad_rows=on_bad_rows,
                                             quarantine_dir=quarantine_dir, rating_range=rating_range)
    return interactions, catalogue, report
