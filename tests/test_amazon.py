"""Amazon JSON converter: tiny hand-written folders with known outputs and each layout error, plus the real
amazon-scientific copy."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysparse.bench.common import dataset_folder, guess_format
from raysparse.cli import main
from raysparse.data.amazon import FORMAT, convert_amazon_json
from raysparse.data.dataset import index_interactions
from raysparse.data.io import load_dataset
from raysparse.data.split import split_last_item
from raysparse.errors import DataError

AMAZON_SCIENTIFIC = Path(__file__).resolve().parents[2] / "shared/datasets/amazon-scientific"

# 3 users, 4 items. Item ids are integers in the lists (as in the real files) and strings as keys.
INTER = {"u1": [10, 11, 12, 13], "u2": [12, 10, 11], "u3": [13, 12]}
ITEMS = {
    "10": {"title": "Hex Bolt", "description": "Zinc plated.", "brand": "Acme",
           "categories": "Industrial & Scientific,Fasteners,Bolts"},
    "11": {"title": "Super Glue", "description": "", "brand": "",
           "categories": "Industrial & Scientific,Tapes, Adhesives & Sealants"},
    "12": {"title": "Caliper"},                                # brand, categories, description missing
    "13": {"title": "Pipette", "description": "10 ml.", "brand": None, "categories": "Lab"},  # null = missing
}


def write_folder(folder: Path, inter: object = None, items: object = None, name: str = "Tiny") -> Path:
    """`<name>.inter.json` + `<name>.item.json` in `folder`; a str is written as is (broken JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, value in ((".inter.json", INTER if inter is None else inter),
                          (".item.json", ITEMS if items is None else items)):
        text = value if isinstance(value, str) else json.dumps(value, indent=2)
        (folder / f"{name}{suffix}").write_text(text, encoding="utf-8")
    return folder


def read_output(dst: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_parquet(dst / "interactions.parquet"), pd.read_parquet(dst / "items.parquet")


def test_tiny_folder_known_rows_and_texts(tmp_path):
    report = convert_amazon_json(str(write_folder(tmp_path / "src")), str(tmp_path / "out"))
    interactions, items = read_output(tmp_path / "out")
    assert list(interactions.columns) == ["user_id", "item_id", "timestamp"]      # implicit: no rating
    assert interactions["timestamp"].dtype == np.int64
    assert all(pd.api.types.is_string_dtype(interactions[c]) for c in ("user_id", "item_id"))
    # File order; timestamp = position in the user's list.
    assert interactions.values.tolist() == [
        ["u1", "10", 0], ["u1", "11", 1], ["u1", "12", 2], ["u1", "13", 3],
        ["u2", "12", 0], ["u2", "10", 1], ["u2", "11", 2],
        ["u3", "13", 0], ["u3", "12", 1]]
    assert list(items.columns) == ["item_id", "title", "brand", "categories", "description"]
    assert items.values.tolist() == [
        ["10", "Hex Bolt", "Acme", "Industrial & Scientific, Fasteners, Bolts", "Zinc plated."],
        # A category whose name holds ", " gets no double space.
        ["11", "Super Glue", "", "Industrial & Scientific, Tapes, Adhesives & Sealants", ""],
        ["12", "Caliper", "", "", ""],
        ["13", "Pipette", "", "Lab", "10 ml."]]
    assert (report.rows_in, report.rows_used, report.rows_quarantined) == (9, 9, 0)
    assert report.users_without_items == 0
    assert "users with an empty list" not in report.summary()


def test_round_trip_through_load_dataset(tmp_path):
    convert_amazon_json(str(write_folder(tmp_path / "src")), str(tmp_path / "out"))
    interactions, catalogue, report = load_dataset(str(tmp_path / "out"))
    assert report.clean and len(interactions) == 9
    # Ids stay text ("10", not 10) and the catalogue keeps its texts.
    assert interactions["item_id"].tolist()[:4] == ["10", "11", "12", "13"]
    assert catalogue["item_id"].tolist() == ["10", "11", "12", "13"]
    assert catalogue.loc[1, "categories"] == "Industrial & Scientific, Tapes, Adhesives & Sealants"
    assert interactions["timestamp"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]


def test_split_keeps_the_list_order(tmp_path):
    """Last list item -> test, second last -> validation; users with < 3 items only train."""
    convert_amazon_json(str(write_folder(tmp_path / "src")), str(tmp_path / "out"))
    interactions, catalogue, _ = load_dataset(str(tmp_path / "out"))
    log = index_interactions(interactions, catalogue)
    split = split_last_item(log, cohort_fraction=0.0)
    item = lambda idx: log.items.raw_ids[idx]  # noqa: E731
    user = dict(zip(("u1", "u2", "u3"), log.users.to_idx(["u1", "u2", "u3"]).tolist()))
    assert (item(split.test_item[user["u1"]]), item(split.val_item[user["u1"]])) == ("13", "12")
    assert (item(split.test_item[user["u2"]]), item(split.val_item[user["u2"]])) == ("11", "10")
    assert [item(i) for i in split.history(user["u1"])] == ["10", "11"]
    assert [item(i) for i in split.history(user["u2"])] == ["12"]
    assert split.test_item[user["u3"]] == -1 and [item(i) for i in split.history(user["u3"])] == ["13", "12"]


def test_users_with_an_empty_list_are_reported(tmp_path):
    inter = {**INTER, "u4": [], "u5": []}
    report = convert_amazon_json(str(write_folder(tmp_path / "src", inter=inter)), str(tmp_path / "out"))
    assert (report.rows_in, report.rows_used) == (9, 9)
    assert report.users_without_items == 2
    assert "users with an empty list (nothing to convert): 2, e.g. 'u4', 'u5'" in report.summary()
    assert report.to_dict()["users_without_items"] == 2
    with pytest.raises(DataError, match=r"holds no interactions \(2 users, all with an empty list\)"):
        convert_amazon_json(str(write_folder(tmp_path / "empty", inter={"u4": [], "u5": []})),
                            str(tmp_path / "out2"))


def test_ignored_item_fields_are_reported(tmp_path):
    items = {**ITEMS, "10": {**ITEMS["10"], "price": "$3"}}
    report = convert_amazon_json(str(write_folder(tmp_path / "src", items=items)), str(tmp_path / "out"))
    assert report.ignored_item_fields == {"price": 1}
    assert "item field 'price' ignored" in report.summary()


def test_item_missing_from_the_catalogue_fails_validation(tmp_path):
    src = write_folder(tmp_path / "src", inter={**INTER, "u3": [13, 99]})
    with pytest.raises(DataError, match=r"Tiny\.inter\.json: 1 of 9 interaction rows are invalid -- item not in "
                                        r"catalogue: 1 row\(s\), e\.g\. Tiny\.inter\.json line 9: user_id=u3 "
                                        r"item_id=99 timestamp=1"):
        convert_amazon_json(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written
    report = convert_amazon_json(str(src), str(tmp_path / "out"), on_bad_rows="quarantine")
    assert (report.rows_in, report.rows_used, report.problems) == (9, 8, {"item not in catalogue": 1})


def test_array_fields_are_joined(tmp_path):
    """Amazon's raw metadata keeps the description as a list of paragraphs and categories as a flat path (2018)
    or a list of paths (2014): joined, categories read like the comma-joined path, blanks dropped."""
    items = {**ITEMS,
             "12": {"title": ["Caliper"], "description": ["Digital, 150 mm.", "", "Battery included."],
                    "brand": [], "categories": [["Industrial & Scientific", "Measuring"], ["Lab"]]},
             "13": {"title": "Pipette", "categories": ["Lab", "Tools , Glass"]}}
    convert_amazon_json(str(write_folder(tmp_path / "src", items=items)), str(tmp_path / "out"))
    _, catalogue = read_output(tmp_path / "out")
    rows = catalogue.set_index("item_id")
    assert rows.loc["12"].tolist() == ["Caliper", "", "Industrial & Scientific, Measuring, Lab",
                                       "Digital, 150 mm. Battery included."]
    assert rows.loc["13"].tolist() == ["Pipette", "", "Lab, Tools, Glass", ""]


@pytest.mark.parametrize("inter, items, match", [
    ('{"u1": [10, 11,]}', None, r"Tiny\.inter\.json: not valid JSON at line 1 column 16 \(Expecting value\)"),
    (None, '{\n  "10": {"title": "a"\n}', r"Tiny\.item\.json: not valid JSON at line 3 column 2"),
    ([["u1", 10]], None, r"Tiny\.inter\.json: the top level is a JSON array; expected an object "
                         r"\{user_id: \[item_id, \.\.\.\]\}"),
    (None, [], r"Tiny\.item\.json: the top level is a JSON array; expected an object \{item_id:"),
    ({"u1": [10], "u2": "10,11"}, None, r"user 'u2' maps to a JSON string \(\"10,11\"\); expected a list of "
                                        r"item ids"),
    ({"u1": [10, None]}, None, r"user 'u1', list position 1: item id null is a JSON null; expected a string or "
                               r"integer item id"),
    (None, {**ITEMS, "12": "Caliper"}, r"item '12' is a JSON string \(\"Caliper\"\); expected an object with "
                                       r"string fields title, brand, categories, description"),
    (None, {**ITEMS, "12": {"title": "Caliper", "categories": ["Lab", 7]}},
     r"item '12', field 'categories' is a JSON array holding something other than strings \(\[\"Lab\", 7\]\); "
     r"expected a string, or an array of strings"),
    (None, {**ITEMS, "12": {"title": 5}}, r"item '12', field 'title' is a JSON number \(5\); expected a string"),
    ('{"u1": [10], "u1": [11]}', None, r"Tiny\.inter\.json: key 'u1' appears more than once"),
    (None, {**ITEMS, " ": {"title": "x"}}, r"1 item\(s\) have a blank item id"),
    (None, {}, r"Tiny\.item\.json: holds no items"),
])
def test_layout_errors(tmp_path, inter, items, match):
    src = write_folder(tmp_path / "src", inter=inter, items=items)
    with pytest.raises(DataError, match=match):
        convert_amazon_json(str(src), str(tmp_path / "out"))


def test_file_discovery_errors(tmp_path):
    src = write_folder(tmp_path / "src")
    write_folder(src, name="Other")
    with pytest.raises(DataError, match=r"needs exactly one \*\.inter\.json file .*found several: "
                                        r"\['Other\.inter\.json', 'Tiny\.inter\.json'\]"):
        convert_amazon_json(str(src), str(tmp_path / "out"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "Tiny.item.json").write_text("{}")
    with pytest.raises(DataError, match=r"needs exactly one \*\.inter\.json file .*found none \(folder holds: "
                                        r"\['Tiny\.item\.json'\]\)"):
        convert_amazon_json(str(tmp_path / "bare"), str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"not a folder"):
        convert_amazon_json(str(tmp_path / "missing"), str(tmp_path / "out"))


def test_guess_format_and_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # dataset_folder's temp folder: inside tmp_path
    src = write_folder(tmp_path / "src")
    assert guess_format(str(src)) == FORMAT == "amazon-json"
    folder, report = dataset_folder(str(src), guess_format(str(src)))
    interactions, items, _ = load_dataset(folder)
    assert len(interactions) == 9 and len(items) == 4 and Path(folder).parent == tmp_path
    assert (report.rows_in, report.rows_used) == (9, 9)
    write_folder(src, name="Other")  # two categories in one folder: not a layout we can guess
    assert guess_format(str(src)) == ""


def test_convert_cli(tmp_path, capsys):
    src = write_folder(tmp_path / "src", inter={**INTER, "u4": []})
    assert main(["data", "convert", "--format", "amazon-json", str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "rows used:        9" in out and "users with an empty list (nothing to convert): 1" in out
    assert (tmp_path / "out" / "items.parquet").exists()
    assert main(["data", "convert", "--format", "amazon-json", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.skipif(not AMAZON_SCIENTIFIC.exists(), reason=f"{AMAZON_SCIENTIFIC} not present")
def test_real_amazon_scientific(tmp_path):
    report = convert_amazon_json(str(AMAZON_SCIENTIFIC), str(tmp_path / "out"))
    interactions, items = read_output(tmp_path / "out")
    assert (report.rows_in, report.rows_used, report.rows_quarantined) == (58_492, 58_492, 0)
    assert report.users_without_items == 0 and report.ignored_item_fields == {}
    assert interactions["user_id"].nunique() == 8_317
    assert len(items) == 4_344 and interactions["item_id"].nunique() == 4_344
    # Timestamps restart at 0 for each user and count up by one.
    positions = interactions.groupby("user_id", sort=False).cumcount().to_numpy()
    assert np.array_equal(interactions["timestamp"].to_numpy(), positions)
    first = items[items["item_id"] == "0"].iloc[0]
    assert first["title"].startswith("SUPCO SPP6 Relay/Capacitor Hard Start Kit")
    assert first["categories"] == ("Industrial & Scientific, Industrial Electrical, Passive Components, "
                                   "Capacitors")
    assert guess_format(str(AMAZON_SCIENTIFIC)) == FORMAT


def test_bad_rows_the_error_names_a_flag_each_command_takes(tmp_path, monkeypatch, capsys):
    """The error says "pass --on-bad-rows quarantine": `data convert`, `bench accuracy` (through
    dataset_folder) and `train` / `tune` (a --set shortcut) take it, and then nothing but the bad row is lost."""
    from raysparse.train_cli import add_config_arguments, config_from_args
    import argparse

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    src = write_folder(tmp_path / "src", inter={**INTER, "u3": [13, 99]})    # item 99 is not in the catalogue
    with pytest.raises(DataError, match=r"item not in catalogue.*pass --on-bad-rows quarantine"):
        dataset_folder(str(src), FORMAT)
    # The bench's reader: the rest converted, the row in quarantine.csv, every later read clean.
    folder, report = dataset_folder(str(src), FORMAT, "quarantine", str(tmp_path / "bench-out"))
    assert (report.rows_in, report.rows_used, report.rows_quarantined) == (9, 8, 1)
    assert "99" in (tmp_path / "bench-out" / "quarantine.csv").read_text()
    assert len(load_dataset(folder)[0]) == 8
    # A standard-schema folder with a bad row is copied without it, so each fit's own read does not stop.
    standard = tmp_path / "standard"
    main(["data", "convert", "--format", FORMAT, str(src), str(standard), "--on-bad-rows", "quarantine"])
    assert "rows quarantined: 1" in capsys.readouterr().out and (standard / "quarantine.csv").exists()
    pd.concat([pd.read_parquet(standard / "interactions.parquet"),
               pd.DataFrame({"user_id": ["u9"], "item_id": ["77"], "timestamp": [0]})]
              ).to_parquet(standard / "interactions.parquet", index=False)
    assert dataset_folder(str(standard)) == (str(standard), None)             # default: read as it is
    copied, report = dataset_folder(str(standard), "", "quarantine", str(tmp_path / "bench-out2"))
    assert report.rows_quarantined == 1 and len(load_dataset(copied)[0]) == 8
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(["--on-bad-rows", "quarantine", "--set", "data.on_bad_rows=fail"]))
    assert config.data.on_bad_rows == "quarantine"                            # the shortcut wins, like --output
