"""Helpers shared by the benchmarks: load a dataset given as a standard-schema folder, a MovieLens layout or
the Amazon JSON layout, and print aligned tables."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from raysparse.data.amazon import FORMAT as AMAZON_FORMAT, INTER_SUFFIX, ITEM_SUFFIX, convert_amazon_json
from raysparse.data.io import ValidationReport, load_dataset
from raysparse.data.movielens import convert_movielens

DEFAULT_ML = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ml-latest-small"


def dataset_folder(data: str, fmt: str = "", on_bad_rows: str = "fail", quarantine_dir: str | None = None
                   ) -> tuple[str, ValidationReport | None]:
    """(a standard-schema folder every later reader can read with on_bad_rows='fail', the validation report or
    None): `data` itself, or a MovieLens / Amazon JSON folder (layout `fmt`) converted into a temp folder. With
    on_bad_rows='quarantine' invalid interaction rows go to `quarantine_dir`/quarantine.csv, and a
    standard-schema folder is copied without them (otherwise each fit would meet them again and stop)."""
    if not fmt and on_bad_rows == "fail":
        return data, None
    out = tempfile.mkdtemp(prefix="raysparse-bench-")
    rows = {"on_bad_rows": on_bad_rows, "quarantine_dir": quarantine_dir}
    if fmt == AMAZON_FORMAT:
        return out, convert_amazon_json(data, out, **rows)
    if fmt:
        return out, convert_movielens(fmt, data, out, **rows)
    interactions, items, report = load_dataset(data, **rows)
    interactions.to_parquet(Path(out) / "interactions.parquet", index=False)
    items.to_parquet(Path(out) / "items.parquet", index=False)
    return out, report


def load_frames(data: str, fmt: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, items) from a standard-schema folder, or a MovieLens / Amazon JSON folder when `fmt`
    names its layout."""
    interactions, items, _ = load_dataset(dataset_folder(data, fmt)[0])
    return interactions, items


def guess_format(data: str) -> str:
    """'movielens-latest' etc. when the folder holds a GroupLens layout, 'amazon-json' when it holds one
    `*.inter.json` and one `*.item.json`, else '' (standard schema)."""
    p = Path(data)
    if (p / "ratings.csv").exists() and (p / "movies.csv").exists():
        return "movielens-latest"
    if (p / "ratings.dat").exists():
        return "movielens-1m"
    if (p / "u.data").exists():
        return "movielens-100k"
    if len(list(p.glob(f"*{INTER_SUFFIX}"))) == 1 and len(list(p.glob(f"*{ITEM_SUFFIX}"))) == 1:
        return AMAZON_FORMAT
    return ""


def print_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Markdown table of `rows`; floats printed with 4 significant decimals. Returns the text."""
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
