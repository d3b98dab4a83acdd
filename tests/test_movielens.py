"""MovieLens converters: tiny hand-written files of each format with known outputs, plus the real ml-latest-small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysparse.cli import main
from raysparse.data.io import load_dataset
from raysparse.data.movielens import convert_movielens
from raysparse.errors import DataError

ML_LATEST_SMALL = Path(__file__).resolve().parents[2] / "shared/datasets/ml-latest-small"


def read_output(dst: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(dst / "interactions.parquet"), pd.read_parquet(dst / "items.parquet")


def check_schema(interactions: pd.DataFrame, items: pd.DataFrame) -> None:
    assert interactions.dtypes.astype(str).to_dict() == {"user_id": "int64", "item_id": "int64",
                                                         "rating": "float32", "timestamp": "int64"}
    assert list(items.columns) == ["item_id", "title", "genres", "tags"]
    assert items["item_id"].dtype == np.int64


def test_movielens_100k(tmp_path):
    src = tmp_path / "ml-100k"
    src.mkdir()
    (src / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n")
    flags_242 = ["0", "0", "0", "1", "1", "1"] + ["0"] * 13        # Animation, Children's, Comedy
    flags_302 = ["1"] + ["0"] * 18                                   # only "unknown": no genre
    (src / "u.item").write_bytes(
        ("242|Kolya (1996)|24-Jan-1997||http://x|" + "|".join(flags_242) + "\n"
         "302|Caf\xe9 Noir (1997)|01-Jan-1997||http://y|" + "|".join(flags_302) + "\n").encode("latin-1"))
    report = convert_movielens("movielens-100k", str(src), str(tmp_path / "out"))
    interactions, items = read_output(tmp_path / "out")
    check_schema(interactions, items)
    assert interactions.values.tolist() == [[196, 242, 3, 881250949], [186, 302, 3, 891717742],
                                            [196, 302, 5, 881250950]]
    assert items.values.tolist() == [[242, "Kolya (1996)", "Animation, Children's, Comedy", ""],
                                     [302, "Café Noir (1997)", "", ""]]
    assert (report.rows_in, report.rows_used, report.rows_quarantined) == (3, 3, 0)


def test_movielens_1m(tmp_path):
    src = tmp_path / "ml-1m"
    src.mkdir()
    (src / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (src / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                     "661::James and the Giant Peach, \"The\" (1996)::Animation|Children's|Musical\n"
                                     "5::Sm\xf8rrebr\xf8d (2000)::Comedy\n".encode("latin-1"))
    report = convert_movielens("movielens-1m", str(src), str(tmp_path / "out"))
    interactions, items = read_output(tmp_path / "out")
    check_schema(interactions, items)
    assert interactions.values.tolist() == [[1, 1193, 5, 978300760], [1, 661, 3, 978302109],
                                            [2, 1193, 4, 978298413]]
    assert items.values.tolist() == [
        [1193, "One Flew Over the Cuckoo's Nest (1975)", "Drama", ""],
        [661, 'James and the Giant Peach, "The" (1996)', "Animation, Children's, Musical", ""],
        [5, "Smørrebrød (2000)", "Comedy", ""]]
    assert report.rows_used == 3


def write_latest(src: Path, ratings: str) -> None:
    src.mkdir(exist_ok=True)
    (src / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + ratings)
    (src / "movies.csv").write_text('movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                                    '2,"American President, The (1995)",Comedy|Drama|Romance\n'
                                    '3,Nothing (2020),(no genres listed)\n')
    (src / "tags.csv").write_text("userId,movieId,tag,timestamp\n2,1,pixar,1\n3,1,fun,2\n4,1,pixar,3\n"
                                  "5,1, Pixar ,4\n2,2,politics,5\n9,77,orphan tag,6\n")


def test_movielens_latest(tmp_path):
    src = tmp_path / "ml-latest"
    write_latest(src, "1,1,4.0,964982703\n1,2,3.5,964981247\n2,1,0.5,964982224\n")
    report = convert_movielens("movielens-latest", str(src), str(tmp_path / "out"))
    interactions, items = read_output(tmp_path / "out")
    check_schema(interactions, items)
    assert interactions.values.tolist() == [[1, 1, 4.0, 964982703], [1, 2, 3.5, 964981247], [2, 1, 0.5, 964982224]]
    # Tags: unique in first-seen order; "Pixar" differs from "pixar"; a tag of an unknown movie is ignored.
    assert items.values.tolist() == [
        [1, "Toy Story (1995)", "Adventure, Animation", "pixar, fun, Pixar"],
        [2, "American President, The (1995)", "Comedy, Drama, Romance", "politics"],
        [3, "Nothing (2020)", "", ""]]
    assert report.to_dict()["rows_used"] == 3
    # The output is a valid dataset in the standard schema.
    loaded, catalogue, report = load_dataset(str(tmp_path / "out"))
    assert len(loaded) == 3 and len(catalogue) == 3 and report.rows_quarantined == 0


def test_movielens_latest_bad_rows_fail_with_the_source_line(tmp_path):
    src = tmp_path / "ml-latest"
    write_latest(src, "1,1,4.0,964982703\n1,42,3.5,964981247\n")
    with pytest.raises(DataError, match=r"item not in catalogue: 1 row\(s\), e\.g\. ratings\.csv line 3: "
                                        r"user_id=1 item_id=42"):
        convert_movielens("movielens-latest", str(src), str(tmp_path / "out"))


def test_missing_source_files_and_unknown_format(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"movielens-1m expects ratings\.dat and movies\.dat in the source folder; "
                                        r"missing: ratings\.dat, movies\.dat \(found: \['ratings\.csv'\]\)"):
        convert_movielens("movielens-1m", str(tmp_path / "src"), str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"--format 'movielens-20m' is not a known MovieLens format"):
        convert_movielens("movielens-20m", str(tmp_path / "src"), str(tmp_path / "out"))


def test_convert_cli(tmp_path, capsys):
    write_latest(tmp_path / "src", "1,1,4.0,964982703\n")
    assert main(["data", "convert", "--format", "movielens-latest", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "rows used:        1" in capsys.readouterr().out
    assert (tmp_path / "out" / "items.parquet").exists()


@pytest.mark.skipif(not ML_LATEST_SMALL.exists(), reason=f"{ML_LATEST_SMALL} not present")
def test_real_ml_latest_small(tmp_path):
    report = convert_movielens("movielens-latest", str(ML_LATEST_SMALL), str(tmp_path / "out"))
    interactions, items = read_output(tmp_path / "out")
    check_schema(interactions, items)
    assert (report.rows_in, report.rows_used, report.rows_quarantined) == (100_836, 100_836, 0)
    assert len(interactions) == 100_836
    assert interactions["user_id"].nunique() == 610
    assert len(items) == 9_742
    toy_story = items[items["item_id"] == 1].iloc[0]
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["genres"] == "Adventure, Animation, Children, Comedy, Fantasy"
    assert toy_story["tags"] == "pixar, fun"
