"""Readers and validation: known answers for every rule, message and count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysparse.cli import main
from raysparse.data.io import (ValidationReport, find_dataset_files, load_dataset, read_catalogue,
                               read_interactions, read_table)
from raysparse.errors import ConfigError, DataError


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


CLEAN_CSV = "user_id,item_id,rating,timestamp\nu1,10,4.5,100\nu2,11,3,200\nu1,11,5,300\n"
ITEMS_CSV = 'item_id,title,genres\n10,"Alpha, the first",Drama\n11,Beta,\n12,Gamma,Comedy\n'


# ------------------------------------------------------------------------------------------- read_table

def test_read_table_csv_lines_count_the_header(tmp_path):
    frame = read_table(write(tmp_path / "log.csv", CLEAN_CSV))
    assert frame["_line"].tolist() == [2, 3, 4]
    assert frame["_source"].astype(str).tolist() == ["log.csv"] * 3


def test_read_table_parquet_and_jsonl_lines_are_row_numbers(tmp_path):
    pd.DataFrame({"user_id": [1, 2], "item_id": [3, 4]}).to_parquet(tmp_path / "log.parquet")
    assert read_table(str(tmp_path / "log.parquet"))["_line"].tolist() == [1, 2]
    # A blank line is still a line: the row after it is line 3.
    path = write(tmp_path / "log.jsonl", '{"user_id": 1, "item_id": 3}\n\n{"user_id": 2, "item_id": 4}\n')
    assert read_table(path)["_line"].tolist() == [1, 3]


def test_read_table_folder_reads_files_sorted_by_name(tmp_path):
    write(tmp_path / "d" / "part-1.csv", "user_id,item_id\nb,2\n")
    write(tmp_path / "d" / "part-0.csv", "user_id,item_id\na,1\nc,3\n")
    write(tmp_path / "d" / "_SUCCESS", "")  # writers' bookkeeping files are skipped
    frame = read_table(str(tmp_path / "d"))
    assert frame["user_id"].tolist() == ["a", "c", "b"]
    assert frame["_source"].astype(str).tolist() == ["part-0.csv", "part-0.csv", "part-1.csv"]
    assert frame["_line"].tolist() == [2, 3, 2]


def test_read_table_rejects_mixed_formats_and_unknown_extensions(tmp_path):
    write(tmp_path / "d" / "a.csv", "user_id,item_id\na,1\n")
    write(tmp_path / "d" / "b.jsonl", '{"user_id": "b", "item_id": 2}\n')
    with pytest.raises(DataError, match=r"folder mixes formats \(csv, jsonl\); keep one format per folder"):
        read_table(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"log\.txt: unknown file format '\.txt'; use one of \.parquet"):
        read_table(write(tmp_path / "log.txt", "x"))


# ------------------------------------------------------------------------------------------- ids and types

def test_integer_ids_stay_int64_and_string_ids_become_str(tmp_path):
    ints, report = read_interactions(write(tmp_path / "a.csv", "user_id,item_id\n1,10\n2,11\n"))
    assert ints["user_id"].dtype == np.int64 and ints["item_id"].dtype == np.int64
    assert ints["user_id"].tolist() == [1, 2]
    strs, _ = read_interactions(write(tmp_path / "b.csv", "user_id,item_id\nu1,i10\nu2,i11\n"))
    assert strs["user_id"].dtype == "str" and strs["item_id"].tolist() == ["i10", "i11"]
    assert report.rows_in == 2 and report.rows_used == 2 and report.problems == {}


def test_jsonl_with_mixed_id_types_reads_ids_as_strings(tmp_path):
    path = write(tmp_path / "log.jsonl", '{"user_id": 1, "item_id": "a"}\n{"user_id": "x", "item_id": 2}\n')
    frame, _ = read_interactions(path)
    assert frame["user_id"].tolist() == ["1", "x"] and frame["item_id"].tolist() == ["a", "2"]


def test_parquet_and_jsonl_read_like_csv(tmp_path):
    expected, _ = read_interactions(write(tmp_path / "log.csv", CLEAN_CSV))
    pd.read_csv(tmp_path / "log.csv").to_parquet(tmp_path / "log.parquet")
    lines = "".join(json.dumps(r) + "\n" for r in pd.read_csv(tmp_path / "log.csv").to_dict("records"))
    for path in (str(tmp_path / "log.parquet"), write(tmp_path / "log.jsonl", lines)):
        frame, report = read_interactions(path)
        pd.testing.assert_frame_equal(frame, expected)
        assert report.rows_used == 3
    assert list(expected.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert expected["rating"].dtype == np.float32 and expected["timestamp"].dtype == np.int64


def test_timestamps_accept_ints_floats_and_iso_strings(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n"
                                       "a,1,100\nb,1,100.9\nc,1,2020-01-01T00:00:00Z\nd,1,2020-01-01 01:00:00\n")
    frame, _ = read_interactions(path)
    assert frame["timestamp"].tolist() == [100, 100, 1577836800, 1577840400]
    # A column that is all ISO-8601 (pyarrow reads it as a timestamp type) converts the same way.
    frame, _ = read_interactions(write(tmp_path / "iso.csv", "user_id,item_id,timestamp\na,1,2020-01-01T00:00:00\n"))
    assert frame["timestamp"].tolist() == [1577836800]


def test_a_bad_value_after_the_first_csv_block_is_reported_not_fatal(tmp_path):
    # pyarrow infers column types from the first ~1 MB; "abc" far below must come back as a bad row.
    body = "".join(f"u{i},{i % 50},3\n" for i in range(120_000))
    path = write(tmp_path / "big.csv", "user_id,item_id,rating\n" + body + "u9,1,abc\n")
    frame, report = read_interactions(path, on_bad_rows="quarantine")
    assert report.problems == {"non-numeric rating": 1}
    assert report.samples["non-numeric rating"] == ["big.csv line 120002: user_id=u9 item_id=1 rating=abc"]
    assert len(frame) == 120_000


# ------------------------------------------------------------------------------------------- validation rules

def test_missing_column_names_file_found_and_required(tmp_path):
    path = write(tmp_path / "log.csv", "uid,item_id,rating\n1,2,3\n")
    with pytest.raises(DataError, match=r"log\.csv: the interaction log is missing required column\(s\) user_id; "
                                        r"found columns \['uid', 'item_id', 'rating'\]; required: user_id, item_id"):
        read_interactions(path)


def test_missing_column_in_one_file_of_a_folder_names_that_file(tmp_path):
    write(tmp_path / "d" / "a.csv", "user_id,item_id\nu,1\n")
    write(tmp_path / "d" / "b.csv", "user,item_id\nu,1\n")
    with pytest.raises(DataError, match=r"^b\.csv: .* missing required column\(s\) user_id"):
        read_interactions(str(tmp_path / "d"))


def test_null_ids_fail_with_file_line_count_and_sample(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id\nu1,1\n,2\nu3,\n  ,4\n")
    with pytest.raises(DataError) as err:
        read_interactions(path)
    message = str(err.value)
    assert "3 of 4 interaction rows are invalid" in message
    assert "null user_id: 2 row(s), e.g. log.csv line 3: user_id=None item_id=2" in message
    assert "null item_id: 1 row(s), e.g. log.csv line 4: user_id=u3 item_id=None" in message
    assert "fix the rows or pass --on-bad-rows quarantine" in message


def test_unparsable_ids(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id\n1,2\n1.5,3\n")
    with pytest.raises(DataError, match=r"unparsable user_id: 1 row\(s\), e.g\. log\.csv line 3: user_id=1\.5"):
        read_interactions(path)


def test_bad_ratings(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,rating\na,1,4\nb,1,x\nc,1,11\nd,1,-1\ne,1,inf\nf,1,\n")
    _, report = read_interactions(path, on_bad_rows="quarantine")
    assert report.problems == {"null rating": 1, "non-numeric rating": 1, "rating out of range": 3}
    assert report.samples["rating out of range"] == ["log.csv line 4: user_id=c item_id=1 rating=11",
                                                     "log.csv line 5: user_id=d item_id=1 rating=-1",
                                                     "log.csv line 6: user_id=e item_id=1 rating=inf"]
    with pytest.raises(DataError, match=r"rating out of range: 1 row\(s\), e\.g\. five\.csv line 3: .*rating=4"):
        read_interactions(write(tmp_path / "five.csv", "user_id,item_id,rating\na,1,1\nb,1,4\n"),
                          rating_range=(0.0, 3.0))


def test_bad_timestamps(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,1,5\nb,1,-5\nc,1,yesterday\n")
    with pytest.raises(DataError, match=r"bad timestamp: 2 row\(s\), e\.g\. log\.csv line 3: user_id=b item_id=1 "
                                        r"timestamp=-5"):
        read_interactions(path)


def test_exact_duplicates_keep_the_first(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,rating\na,1,4\na,1,5\na,1,4.0\nb,1,4\na,1,4\n")
    frame, report = read_interactions(path, on_bad_rows="quarantine")
    assert frame.values.tolist() == [["a", 1, 4.0], ["a", 1, 5.0], ["b", 1, 4.0]]
    assert report.problems == {"duplicate row": 2}
    assert [s.split(":")[0] for s in report.samples["duplicate row"]] == ["log.csv line 4", "log.csv line 6"]
    with pytest.raises(DataError, match=r"duplicate row: 2 row\(s\), e\.g\. log\.csv line 4: user_id=a item_id=1 "
                                        r"rating=4\.0"):
        read_interactions(path)


def test_items_missing_from_the_catalogue(tmp_path):
    catalogue = pd.DataFrame({"item_id": [10, 11]})
    path = write(tmp_path / "log.csv", "user_id,item_id\na,10\na,99\nb,98\n")
    with pytest.raises(DataError, match=r"item not in catalogue: 2 row\(s\), e\.g\. log\.csv line 3: user_id=a "
                                        r"item_id=99"):
        read_interactions(path, catalogue=catalogue)


def test_int_log_against_str_catalogue_takes_the_catalogue_type(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id\na,10\nb,7\n")
    frame, report = read_interactions(path, catalogue=pd.DataFrame({"item_id": ["10", "x"]}),
                                      on_bad_rows="quarantine")
    assert frame["item_id"].tolist() == ["10"] and report.problems == {"item not in catalogue": 1}


def test_one_reason_per_row_and_counts_add_up(tmp_path):
    # Row 3 has a null user AND a bad rating: counted once, under the first reason.
    path = write(tmp_path / "log.csv", "user_id,item_id,rating\na,1,4\n,1,x\nb,2,3\n")
    frame, report = read_interactions(path, on_bad_rows="quarantine", catalogue=pd.DataFrame({"item_id": [1]}))
    assert report.problems == {"null user_id": 1, "item not in catalogue": 1}
    assert (report.rows_in, report.rows_used, report.rows_quarantined) == (3, 1, 2)
    assert len(frame) == 1


def test_quarantine_file_lists_source_line_reason_and_original_values(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id,rating,timestamp\nu1,1,4,10\n,2,3,20\nu2,3,99,30\n"
                                       "u1,1,4,10\nu3,4,2,-1\nu4,5,1,40\n")
    frame, report = read_interactions(path, on_bad_rows="quarantine", quarantine_dir=str(tmp_path / "q"))
    assert report.quarantine_path == str(tmp_path / "q" / "quarantine.csv")
    assert Path(report.quarantine_path).read_text() == (
        "source,line,reason,user_id,item_id,rating,timestamp\n"
        "log.csv,3,null user_id,,2,3,20\n"
        "log.csv,4,rating out of range,u2,3,99,30\n"
        "log.csv,5,duplicate row,u1,1,4,10\n"
        "log.csv,6,bad timestamp,u3,4,2,-1\n")
    assert report.to_dict() == {
        "rows_in": 6, "rows_used": 2, "rows_quarantined": 4,
        "problems": {"null user_id": 1, "rating out of range": 1, "bad timestamp": 1, "duplicate row": 1},
        "samples": {"null user_id": ["log.csv line 3: user_id=None item_id=2 rating=3 timestamp=20"],
                    "rating out of range": ["log.csv line 4: user_id=u2 item_id=3 rating=99 timestamp=30"],
                    "bad timestamp": ["log.csv line 6: user_id=u3 item_id=4 rating=2 timestamp=-1"],
                    "duplicate row": ["log.csv line 5: user_id=u1 item_id=1 rating=4 timestamp=10"]},
        "quarantine_path": report.quarantine_path}
    assert frame["user_id"].tolist() == ["u1", "u4"]
    summary = report.summary()
    assert "rows in:          6" in summary and "  duplicate row: 1" in summary and "quarantine file:" in summary


def test_quarantine_without_a_folder_counts_only(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id\n,1\nu,2\n")
    before = sorted(os.listdir(tmp_path))
    _, report = read_interactions(path, on_bad_rows="quarantine")
    assert report.quarantine_path is None and report.rows_quarantined == 1
    assert sorted(os.listdir(tmp_path)) == before


def test_samples_are_capped_at_five(tmp_path):
    path = write(tmp_path / "log.csv", "user_id,item_id\n" + ",1\n" * 8)
    _, report = read_interactions(path, on_bad_rows="quarantine")
    assert report.problems == {"null user_id": 8} and len(report.samples["null user_id"]) == 5


def test_report_invariant_is_enforced():
    with pytest.raises(AssertionError, match="does not add up"):
        ValidationReport(rows_in=3, rows_used=1, rows_quarantined=1)


def test_bad_on_bad_rows_and_empty_log(tmp_path):
    path = write(tmp_path / "log.csv", CLEAN_CSV)
    with pytest.raises(ConfigError, match=r"on_bad_rows='skip' is not allowed; choose 'fail'"):
        read_interactions(path, on_bad_rows="skip")
    with pytest.raises(DataError, match=r"empty\.csv: the interaction log has no rows"):
        read_interactions(write(tmp_path / "empty.csv", "user_id,item_id\n"))


def test_malformed_csv_and_json_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"bad\.csv: cannot parse as CSV .*Expected 2 columns"):
        read_table(write(tmp_path / "bad.csv", "user_id,item_id\n1,2,3\n"))
    (tmp_path / "latin.csv").write_bytes("user_id,item_id\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: column\(s\) \['item_id'\] are not valid UTF-8 text"):
        read_table(str(tmp_path / "latin.csv"))
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
        read_table(write(tmp_path / "bad.jsonl", '{"user_id": 1, "item_id": 2}\n{"user_id": \n'))


# ------------------------------------------------------------------------------------------- catalogue

def test_read_catalogue_returns_text_with_blanks_for_missing(tmp_path):
    items = read_catalogue(write(tmp_path / "items.csv", ITEMS_CSV))
    assert items.to_dict("list") == {"item_id": [10, 11, 12], "title": ["Alpha, the first", "Beta", "Gamma"],
                                     "genres": ["Drama", "", "Comedy"]}
    assert items["item_id"].dtype == np.int64 and items["title"].dtype == "str"


def test_read_catalogue_errors(tmp_path):
    with pytest.raises(DataError, match=r"items\.csv: the item catalogue is missing required column\(s\) item_id; "
                                        r"found columns \['id', 'title'\]"):
        read_catalogue(write(tmp_path / "items.csv", "id,title\n1,a\n"))
    with pytest.raises(DataError, match=r"2 catalogue row\(s\) have a null or unparsable item_id, e\.g\. "
                                        r"nulls\.csv line 3: item_id=None"):
        read_catalogue(write(tmp_path / "nulls.csv", "item_id,title\n1,a\n,b\n,c\n"))
    with pytest.raises(DataError, match=r"1 catalogue row\(s\) repeat an item_id, e\.g\. dup\.csv line 4: item_id=1 "
                                        r"repeats dup\.csv line 2"):
        read_catalogue(write(tmp_path / "dup.csv", "item_id,title\n1,a\n2,b\n1,c\n"))


# ------------------------------------------------------------------------------------------- datasets

def test_find_dataset_files(tmp_path):
    write(tmp_path / "ds" / "interactions.csv", CLEAN_CSV)
    write(tmp_path / "ds" / "items.csv", ITEMS_CSV)
    assert find_dataset_files(str(tmp_path / "ds")) == (str(tmp_path / "ds" / "interactions.csv"),
                                                        str(tmp_path / "ds" / "items.csv"))
    assert find_dataset_files(str(tmp_path / "ds" / "items.csv")) == (str(tmp_path / "ds" / "items.csv"), None)
    write(tmp_path / "parts" / "p0.csv", CLEAN_CSV)
    assert find_dataset_files(str(tmp_path / "parts")) == (str(tmp_path / "parts"), None)
    write(tmp_path / "ds" / "interactions.jsonl", "")
    with pytest.raises(DataError, match=r"found several interactions inputs \(interactions\.csv, "
                                        r"interactions\.jsonl\); keep exactly one"):
        find_dataset_files(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"dataset path '.*nowhere' does not exist"):
        find_dataset_files(str(tmp_path / "nowhere"))


def test_load_dataset_reads_a_folder_with_interaction_parts(tmp_path):
    write(tmp_path / "ds" / "interactions" / "a.csv", "user_id,item_id\nu1,10\n")
    write(tmp_path / "ds" / "interactions" / "b.csv", "user_id,item_id\nu2,12\nu2,13\n")
    write(tmp_path / "ds" / "items.csv", ITEMS_CSV)
    interactions, items, report = load_dataset(str(tmp_path / "ds"), on_bad_rows="quarantine")
    assert interactions.values.tolist() == [["u1", 10], ["u2", 12]]
    assert report.samples == {"item not in catalogue": ["b.csv line 3: user_id=u2 item_id=13"]}
    assert len(items) == 3


def test_load_dataset_needs_a_catalogue(tmp_path):
    path = write(tmp_path / "log.csv", CLEAN_CSV)
    with pytest.raises(DataError, match=r"log\.csv: no item catalogue found; put items\.parquet, items\.csv or "
                                        r"items\.jsonl beside the interactions .* --set data\.items_path=PATH "
                                        r"\(train, tune, the jobs\), --items PATH \(data check\)"):
        load_dataset(path)
    interactions, items, _ = load_dataset(path, write(tmp_path / "cat.csv", ITEMS_CSV))
    assert len(interactions) == 3 and items["item_id"].tolist() == [10, 11, 12]


# ------------------------------------------------------------------------------------------- raysparse data check

def test_data_check_reports_problems_and_changes_nothing(tmp_path, capsys):
    write(tmp_path / "ds" / "interactions.csv", "user_id,item_id,rating\nu1,10,4\n,11,3\nu1,10,4\nu2,99,1\n")
    write(tmp_path / "ds" / "items.csv", ITEMS_CSV)
    before = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert main(["data", "check", str(tmp_path / "ds")]) == 1
    out = capsys.readouterr().out
    assert "rows in:          4" in out and "rows used:        1" in out and "rows quarantined: 3" in out
    assert "  null user_id: 1" in out and "    interactions.csv line 3: user_id=None item_id=11 rating=3" in out
    assert "  duplicate row: 1" in out and "  item not in catalogue: 1" in out
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == before


def test_data_check_clean_dataset_exits_0(tmp_path, capsys):
    write(tmp_path / "ds" / "interactions.csv", CLEAN_CSV)
    write(tmp_path / "ds" / "items.csv", ITEMS_CSV)
    assert main(["data", "check", str(tmp_path / "ds")]) == 0
    assert "clean" in capsys.readouterr().out


def test_data_check_reports_file_level_problems_and_bad_paths(tmp_path, capsys):
    write(tmp_path / "ds" / "interactions.csv", "uid,item_id\n1,2\n")
    assert main(["data", "check", str(tmp_path / "ds")]) == 1
    assert "missing required column(s) user_id" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "error: dataset path" in capsys.readouterr().err
