"""Convert the Amazon JSON layout (per-category folders of Amazon Review Data) to the standard schema.

Layout (any Amazon category, e.g. shared/datasets/amazon-scientific/), one folder holding
  <Name>.inter.json  {user_id: [item_id, ...]}: each user's items oldest first. There are no timestamps: the
                     list order is the time order. Item ids may be JSON strings or integers.
  <Name>.item.json   {item_id: {"title", "description", "brand", "categories"}}: strings; a field may be empty,
                     missing or null. `categories` is one comma-joined path such as
                     "Industrial & Scientific,Tapes, Adhesives & Sealants,Adhesive Tapes". A field may also be
                     an array of strings, as in Amazon's raw metadata (a description's paragraphs, a category
                     path, nested lists of paths): categories are joined with ",", other fields with " ".

Output: dst/interactions.parquet (user_id str, item_id str, timestamp int64) and dst/items.parquet (item_id
str, title, brand, categories, description; "" where missing). The timestamp is the position in the user's
list, 0..n-1, so every later step (the last-item split, the Ray Data reader) keeps the list order; it is not
a clock. There is no rating column: the data is implicit feedback. Categories become readable text ("," ->
", "); other item fields are ignored and counted in the report.
Interactions go through the same validation as any other log (against the converted catalogue); in its
samples, "line N" is the N-th interaction in file order, and user_id + timestamp (list position) locate it
in the file. A user with an empty list has nothing to convert; such users are counted in the report.

Data source: Amazon Review Data (2018), for research use; cite Jianmo Ni, Jiacheng Li, Julian McAuley, 2019,
"Justifying Recommendations using Distantly-Labeled Reviews and Fine-Grained Aspects", EMNLP.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd

from raysparse.data.io import MAX_SAMPLES, ValidationReport, validate_interactions
from raysparse.errors import DataError

FORMAT = "amazon-json"
INTER_SUFFIX = ".inter.json"
ITEM_SUFFIX = ".item.json"
ITEM_FIELDS = ("title", "brand", "categories", "description")  # output column order after item_id
_ITEM_FIELD_SET = frozenset(ITEM_FIELDS)


@dataclass
class AmazonReport(ValidationReport):
    """The interactions' validation report plus what the layout itself held that became no row.

    Users with an empty list and ignored item fields sit outside `rows_in` (they are not interactions), so
    the report's invariant is unchanged; `summary()` lists them so nothing disappears unnoticed.
    """

    users_without_items: int = 0
    users_without_items_samples: list[str] = field(default_factory=list)
    ignored_item_fields: dict[str, int] = field(default_factory=dict)  # field name -> items that have it

    def summary(self) -> str:
        lines = [super().summary()]
        if self.users_without_items:
            sample = ", ".join(repr(u) for u in self.users_without_items_samples)
            lines.append(f"users with an empty list (nothing to convert): {self.users_without_items:,}, "
                         f"e.g. {sample}")
        for name, count in self.ignored_item_fields.items():
            lines.append(f"item field {name!r} ignored (not in {', '.join(ITEM_FIELDS)}): {count:,} items")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(users_without_items=self.users_without_items,
                   users_without_items_samples=list(self.users_without_items_samples),
                   ignored_item_fields=dict(self.ignored_item_fields))
        return out


class _RepeatedKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook: the json module keeps only the last of repeated keys, which would drop a user's
    list or an item without a word; refuse them instead."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return out


def _json_kind(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _preview(value: object, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def _load_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); re-save the file as "
                        f"UTF-8 JSON.") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno} column {err.colno} ({err.msg}); fix the "
                        f"file there (an unquoted key, a trailing comma or a truncated download are usual "
                        f"causes).") from None
    except _RepeatedKey as err:
        raise DataError(f"{path}: key {err.key!r} appears more than once in one JSON object; JSON readers keep "
                        f"only the last, which would silently drop data. Merge the entries into one.") from None


def find_amazon_files(src: str) -> tuple[Path, Path]:
    """(the one `*.inter.json`, the one `*.item.json`) of an Amazon JSON folder; DataError otherwise."""
    folder = Path(src)
    if not folder.is_dir():
        raise DataError(f"{src}: not a folder; --format {FORMAT} expects a folder holding <Name>{INTER_SUFFIX} "
                        f"and <Name>{ITEM_SUFFIX} (e.g. shared/datasets/amazon-scientific/).")
    found = []
    for suffix, what in ((INTER_SUFFIX, "interactions {user_id: [item_id, ...]}"),
                         (ITEM_SUFFIX, "item texts {item_id: {title, ...}}")):
        matches = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        if len(matches) != 1:
            names = [p.name for p in matches]
            others = sorted(p.name for p in folder.iterdir())
            held = (f"{others[:10]}" + (f" and {len(others) - 10} more" if len(others) > 10 else "")
                    if others else "nothing")
            detail = f"found several: {names}" if names else f"found none (folder holds: {held})"
            raise DataError(f"{src}: --format {FORMAT} needs exactly one *{suffix} file ({what}); {detail}. "
                            f"Point SRC at a folder with one <Name>{INTER_SUFFIX} and one <Name>{ITEM_SUFFIX}, "
                            f"moving other categories into folders of their own.")
        found.append(matches[0])
    return found[0], found[1]


def _joined(values: list, name: str) -> str | None:
    """An array field as one string, or None when it holds anything but strings (and arrays of them).

    Amazon's own metadata keeps some fields as arrays: the 2018 files' `description` is a list of paragraphs
    and their category path a flat list, the 2014 files' `categories` a list of paths (lists). Categories are
    joined with "," (then read like the comma-joined path above), other fields with " "; empty strings drop.
    """
    flat: list[str] = []
    stack = [iter(values)]
    while stack:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
        elif isinstance(value, list):
            stack.append(iter(value))
        elif isinstance(value, str):
            if value.strip():
                flat.append(value.strip())
        else:
            return None
    return ("," if name == "categories" else " ").join(flat)


_END = object()


def _read_items(path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The catalogue (item_id + ITEM_FIELDS as str, "" where missing) and the ignored fields' counts."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level is a JSON {_json_kind(data)}; expected an object "
                        f'{{item_id: {{"title": ..., "brand": ..., "categories": ..., "description": ...}}}}. '
                        f"Check that SRC holds the Amazon JSON layout.")
    if not data:
        raise DataError(f"{path}: holds no items; the catalogue needs one entry per item "
                        f'({{item_id: {{"title": ...}}}}).')
    blank = [key for key in data if not key.strip()]
    if blank:  # the standard catalogue reads a blank id as missing and would refuse the converted file
        raise DataError(f"{path}: {len(blank)} item(s) have a blank item id ({blank[0]!r}); every item needs "
                        f"a non-empty id. Fix or remove those entries.")
    columns: dict[str, list[str]] = {name: [] for name in ITEM_FIELDS}
    ignored: dict[str, int] = {}
    for item_id, entry in data.items():  # a Python loop: catalogues have thousands to a few million items
        if not isinstance(entry, dict):
            raise DataError(f"{path}: item {item_id!r} is a JSON {_json_kind(entry)} ({_preview(entry)}); "
                            f"expected an object with string fields {', '.join(ITEM_FIELDS)}. Fix that entry.")
        for name in ITEM_FIELDS:
            value = entry.get(name)
            if value is None:  # missing or null: no text for that field
                value = ""
            elif isinstance(value, list):
                value = _joined(value, name)
                if value is None:
                    raise DataError(f"{path}: item {item_id!r}, field {name!r} is a JSON array holding something "
                                    f"other than strings ({_preview(entry.get(name))}); expected a string, or "
                                    f"an array of strings (nested arrays allowed). Fix that value.")
            elif not isinstance(value, str):
                raise DataError(f"{path}: item {item_id!r}, field {name!r} is a JSON {_json_kind(value)} "
                                f"({_preview(value)}); expected a string or an array of strings (\"\" or "
                                f"leave the field out when there is no text). Fix that value.")
            columns[name].append(value)
        for name in entry.keys() - _ITEM_FIELD_SET:
            ignored[name] = ignored.get(name, 0) + 1
    items = pd.DataFrame({"item_id": list(data.keys()), **columns}).astype("str")
    # "A,Tapes, Adhesives & Sealants" -> "A, Tapes, Adhesives & Sealants": names that contain ", " already
    # must not get a double space, hence split on the comma with any spaces around it.
    items["categories"] = items["categories"].str.replace(r"\s*,\s*", ", ", regex=True).str.strip(", ")
    return items, dict(sorted(ignored.items()))


def _read_interactions(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The raw log (user_id, item_id, timestamp = list position, `_source`, `_line`) in file order, and
    the users whose list is empty."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level is a JSON {_json_kind(data)}; expected an object "
                        f"{{user_id: [item_id, ...]}} with each user's items oldest first. Check that SRC "
                        f"holds the Amazon JSON layout.")
    users = list(data.keys())
    lists = list(data.values())
    for user, items in zip(users, lists):
        if not isinstance(items, list):
            raise DataError(f"{path}: user {user!r} maps to a JSON {_json_kind(items)} ({_preview(items)}); "
                            f"expected a list of item ids, oldest first, e.g. [\"item1\", \"item2\"]. Fix that "
                            f"entry.")
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    empty = [users[i] for i in np.flatnonzero(lengths == 0)]
    flat = list(chain.from_iterable(lists))
    kinds = set(map(type, flat))
    if not kinds <= {str, int}:  # bool is not int here: type() is exact
        bad = next(i for i, v in enumerate(flat) if type(v) not in (str, int))
        owner = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        position = bad - int(lengths[:owner].sum())
        raise DataError(f"{path}: user {users[owner]!r}, list position {position}: item id "
                        f"{_preview(flat[bad])} is a JSON {_json_kind(flat[bad])}; expected a string or "
                        f"integer item id (a key of the *{ITEM_SUFFIX} file). Fix that value.")
    item_ids = flat if kinds <= {str} else [str(v) for v in flat]
    n = len(flat)
    starts = np.cumsum(lengths) - lengths
    frame = pd.DataFrame({
        "user_id": pd.Series(np.repeat(np.array(users, dtype=object), lengths), dtype="str"),
        "item_id": pd.Series(item_ids, dtype="str"),
        # Position in the user's list: the split orders each user's rows by timestamp.
        "timestamp": np.arange(n, dtype=np.int64) - np.repeat(starts, lengths),
    })
    frame["_line"] = np.arange(1, n + 1, dtype=np.int64)
    frame["_source"] = pd.Categorical.from_codes(np.zeros(n, np.int32), categories=[path.name])
    return frame, empty


def convert_amazon_json(src: str, dst: str, *, on_bad_rows: str = "fail",
                        quarantine_dir: str | None = None) -> AmazonReport:
    """Convert an Amazon JSON folder `src` to the standard schema in `dst` (see the module docstring).

    Returns the validation report of the interactions, with the users that had an empty list counted.
    Layout errors (files, JSON syntax, types) raise DataError naming the file and the user or item.
    """
    inter_path, item_path = find_amazon_files(src)
    items, ignored = _read_items(item_path)
    raw, empty = _read_interactions(inter_path)
    if len(raw) == 0:
        hint = f" ({len(empty):,} users, all with an empty list)" if empty else ""
        raise DataError(f"{inter_path}: holds no interactions{hint}; each user needs a list of item ids, "
                        f"oldest first.")
    interactions, report = validate_interactions(raw, str(inter_path), catalogue=items, on_bad_rows=on_bad_rows,
                                                 quarantine_dir=quarantine_dir)
    interactions = interactions.astype({"user_id": "str", "item_id": "str", "timestamp": np.int64})
    os.makedirs(dst, exist_ok=True)
    interactions.to_parquet(os.path.join(dst, "interactions.parquet"), index=False)
    items.to_parquet(os.path.join(dst, "items.parquet"), index=False)
    return AmazonReport(**{f.name: getattr(report, f.name) for f in fields(report)},
                        users_without_items=len(empty), users_without_items_samples=empty[:MAX_SAMPLES],
                        ignored_item_fields=ignored)
