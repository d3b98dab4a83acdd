"""Convert GroupLens MovieLens downloads to the standard schema.

  movielens-100k    u.data (tab: user item rating timestamp) + u.item (pipe-separated, latin-1: id, title,
                    release date, video date, IMDb URL, 19 genre flags)
  movielens-1m      ratings.dat (UserID::MovieID::Rating::Timestamp) + movies.dat (MovieID::Title::Genres),
                    latin-1
  movielens-latest  ratings.csv + movies.csv + tags.csv (ml-latest and ml-latest-small), UTF-8

Output: dst/interactions.parquet (user_id int64, item_id int64, rating float32, timestamp int64) and
dst/items.parquet (item_id int64, title, genres, tags; "" where none). Genres are text such as
"Adventure, Animation" ("|" becomes ", "; "(no genres listed)" and 100k's "unknown" become "");
tags of a movie are unique, in first-seen order, joined by ", ".
Interactions go through the same validation as any other log (against the converted catalogue).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from raysparse.data.io import ValidationReport, validate_interactions
from raysparse.errors import DataError

FORMATS = ("movielens-100k", "movielens-1m", "movielens-latest")
# u.genre of ml-100k, in flag order. "unknown" is not a genre; it maps to no genre.
GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western"]
_EXPECTED = {"movielens-100k": ("u.data", "u.item"), "movielens-1m": ("ratings.dat", "movies.dat"),
             "movielens-latest": ("ratings.csv", "movies.csv")}
_RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def _genres_text(genres: pd.Series) -> pd.Series:
    """"Adventure|Animation" -> "Adventure, Animation"; "(no genres listed)" -> ""."""
    text = genres.fillna("").astype(str).str.replace("(no genres listed)", "", regex=False)
    return text.str.replace("|", ", ", regex=False)


def _with_lines(frame: pd.DataFrame, source: str, first_line: int) -> pd.DataFrame:
    frame["_line"] = np.arange(first_line, first_line + len(frame), dtype=np.int64)
    frame["_source"] = pd.Categorical.from_codes(np.zeros(len(frame), np.int32), categories=[source])
    return frame


def _read_double_colon(path: Path, names: list[str], dtypes: dict | None = None) -> pd.DataFrame:
    """`::`-separated latin-1 file. pandas needs its slow Python engine for a two-character separator, so
    turn `::` into a tab (neither appears inside ML-1M fields) and use the C parser."""
    text = path.read_bytes().decode("latin-1").replace("::", "\t")
    return pd.read_csv(io.StringIO(text), sep="\t", header=None, names=names, quoting=csv.QUOTE_NONE,
                       dtype=dtypes, keep_default_na=False)


def _load_100k(src: Path) -> tuple[pd.DataFrame, pd.DataFrame, str, int]:
    ratings = pd.read_csv(src / "u.data", sep="\t", header=None, names=_RATING_COLUMNS)
    flags = [f"g{i}" for i in range(len(GENRES_100K))]
    movies = pd.read_csv(src / "u.item", sep="|", header=None, encoding="latin-1", quoting=csv.QUOTE_NONE,
                         names=["item_id", "title", "release_date", "video_release_date", "url"] + flags,
                         keep_default_na=False)
    onehot = movies[flags].to_numpy(dtype=bool)
    onehot[:, 0] = False  # "unknown"
    names = np.array(GENRES_100K, dtype=object)
    genres = [", ".join(names[row]) for row in onehot]  # 1,682 movies: a Python loop is fine here
    items = pd.DataFrame({"item_id": movies["item_id"], "title": movies["title"], "genres": genres, "tags": ""})
    return ratings, items, "u.data", 1


def _load_1m(src: Path) -> tuple[pd.DataFrame, pd.DataFrame, str, int]:
    ratings = _read_double_colon(src / "ratings.dat", _RATING_COLUMNS)
    movies = _read_double_colon(src / "movies.dat", ["item_id", "title", "genres"],
                                {"item_id": np.int64, "title": str, "genres": str})
    items = pd.DataFrame({"item_id": movies["item_id"], "title": movies["title"],
                          "genres": _genres_text(movies["genres"]), "tags": ""})
    return ratings, items, "ratings.dat", 1


def _tags_text(tags_path: Path, item_ids: pd.Series) -> pd.Series:
    """Per catalogue item: its tags, unique (exact text, whitespace trimmed) in first-seen order, ", "-joined."""
    if not tags_path.exists():
        return pd.Series([""] * len(item_ids), dtype="str")
    tags = pd.read_csv(tags_path, usecols=["movieId", "tag"], dtype={"movieId": np.int64, "tag": str})
    tags["tag"] = tags["tag"].str.strip()
    tags = tags[tags["tag"].notna() & (tags["tag"] != "")].drop_duplicates(["movieId", "tag"], keep="first")
    joined = tags.groupby("movieId", sort=False)["tag"].agg(", ".join)
    return item_ids.map(joined).fillna("").astype("str")


def _load_latest(src: Path) -> tuple[pd.DataFrame, pd.DataFrame, str, int]:
    ratings = pd.read_csv(src / "ratings.csv", engine="pyarrow")
    missing = [c for c in ("userId", "movieId", "rating", "timestamp") if c not in ratings.columns]
    if missing:
        raise DataError(f"{src / 'ratings.csv'}: missing column(s) {', '.join(missing)}; found "
                        f"{list(ratings.columns)}; a MovieLens ratings.csv has userId,movieId,rating,timestamp.")
    ratings = ratings.rename(columns={"userId": "user_id", "movieId": "item_id"})[_RATING_COLUMNS]
    movies = pd.read_csv(src / "movies.csv", dtype={"movieId": np.int64, "title": str, "genres": str},
                         keep_default_na=False)
    items = pd.DataFrame({"item_id": movies["movieId"], "title": movies["title"],
                          "genres": _genres_text(movies["genres"])})
    items["tags"] = _tags_text(src / "tags.csv", items["item_id"])
    return ratings, items, "ratings.csv", 2


def convert_movielens(fmt: str, src: str, dst: str, *, on_bad_rows: str = "fail",
                      quarantine_dir: str | None = None) -> ValidationReport:
    """Convert a MovieLens folder `src` (format `fmt`, one of FORMATS) to the standard schema in `dst`.

    Returns the validation report of the interactions (MovieLens releases are clean: all rows used).
    """
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r} is not a known MovieLens format; choose one of {', '.join(FORMATS)}.")
    src_path = Path(src)
    needed = _EXPECTED[fmt]
    missing = [name for name in needed if not (src_path / name).is_file()]
    if missing:
        found = sorted(p.name for p in src_path.iterdir()) if src_path.is_dir() else []
        raise DataError(f"{src}: {fmt} expects {' and '.join(needed)} in the source folder; missing: "
                        f"{', '.join(missing)} (found: {found or 'nothing'}); point SRC at the "
                        f"unzipped MovieLens folder or pick the matching --format.")
    loader = {"movielens-100k": _load_100k, "movielens-1m": _load_1m, "movielens-latest": _load_latest}[fmt]
    ratings, items, source, first_line = loader(src_path)
    items = items.astype({"title": "str", "genres": "str", "tags": "str"})
    items["item_id"] = items["item_id"].astype(np.int64)
    repeated = items["item_id"][items["item_id"].duplicated()]
    if len(repeated):
        raise DataError(f"{src}: the {fmt} movie list repeats {len(repeated)} movie id(s), e.g. "
                        f"{repeated.head(5).tolist()}; movie ids must be unique, fix the movie file.")
    interactions, report = validate_interactions(_with_lines(ratings, source, first_line), str(src_path / source),
                                                 catalogue=items, on_bad_rows=on_bad_rows,
                                                 quarantine_dir=quarantine_dir, rating_range=(0.0, 5.0))
    interactions = interactions.astype({"user_id": np.int64, "item_id": np.int64, "rating": np.float32,
                                        "timestamp": np.int64})
    os.makedirs(dst, exist_ok=True)
    interactions.to_parquet(os.path.join(dst, "interactions.parquet"), index=False)
    items.to_parquet(os.path.join(dst, "items.parquet"), index=False)
    return report
