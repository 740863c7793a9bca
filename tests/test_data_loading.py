"""read_rows: every supported storage gives the same (row_number, row) stream, and broken input fails loudly."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import datasets
import pytest

from dpokit.data.loading import read_rows
from dpokit.data.records import DataError

ROWS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def numbered(rows: list[dict]) -> list[tuple[int, dict]]:
    return list(enumerate(rows, 1))


# --- formats --------------------------------------------------------------------------------


def test_jsonl_row_numbers_are_line_numbers_and_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert list(read_rows(str(path))) == [(1, ROWS[0]), (3, ROWS[1])]


def test_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert list(read_rows(str(path))) == numbered(ROWS)


def test_json_lines_inside_a_json_file(tmp_path):
    path = write_jsonl(tmp_path / "data.json", ROWS)
    assert list(read_rows(str(path))) == numbered(ROWS)


def test_json_object_holding_one_list_of_rows(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"version": 2, "data": ROWS}), encoding="utf-8")
    assert list(read_rows(str(path))) == numbered(ROWS)


def test_json_single_row_object_is_not_mistaken_for_a_wrapper(tmp_path):
    path = tmp_path / "data.json"
    row = {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"}}
    path.write_text(json.dumps(row), encoding="utf-8")
    with pytest.raises(DataError, match="found an object with keys conversations, chosen"):
        list(read_rows(str(path)))


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert list(read_rows(str(path))) == numbered(ROWS)


def test_csv_numbers_data_rows_from_one(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(ROWS + [{"prompt": "multi\nline", "chosen": 'a "quoted", b', "rejected": "c"}])
    rows = list(read_rows(str(path)))
    assert rows[:2] == numbered(ROWS)
    assert rows[2] == (3, {"prompt": "multi\nline", "chosen": 'a "quoted", b', "rejected": "c"})


@pytest.mark.parametrize("name", ["data.jsonl.gz", "data.json.gz"])
def test_gzipped_json_and_jsonl(tmp_path, name):
    path = tmp_path / name
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write("".join(json.dumps(row) + "\n" for row in ROWS))
    assert list(read_rows(str(path))) == numbered(ROWS)


def test_gzipped_csv(tmp_path):
    path = tmp_path / "data.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as stream:
        stream.write("prompt,chosen,rejected\n2+2?,4,5\n")
    assert list(read_rows(str(path))) == [(1, ROWS[0])]


def test_dataset_save_to_disk_folder(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert list(read_rows(str(tmp_path / "saved"))) == numbered(ROWS)


def test_dataset_dict_save_to_disk_folder_picks_the_split(tmp_path):
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[1:])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    assert list(read_rows(str(tmp_path / "saved"))) == numbered(ROWS)
    assert list(read_rows(str(tmp_path / "saved"), split="test")) == [(1, ROWS[1])]


def test_dataset_dict_missing_split_lists_the_available_ones(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"split 'validation' not found; available splits: train"):
        read_rows(str(tmp_path / "saved"), split="validation")


def test_local_folder_of_jsonl_files_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS)
    write_jsonl(folder / "test.jsonl", ROWS[:1])
    assert list(read_rows(str(folder))) == numbered(ROWS)
    assert list(read_rows(str(folder), split="test")) == [(1, ROWS[0])]


# --- errors ---------------------------------------------------------------------------------


def test_bad_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "chosen": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl, row 2: line 2 is not valid JSON") as caught:
        list(read_rows(str(path)))
    assert caught.value.row == 2


def test_bad_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "x"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError, match=r"data\.json: not valid JSON: .* at line 3, column"):
        list(read_rows(str(path)))


@pytest.mark.parametrize(
    "name, content",
    [
        ("a.jsonl", ""),
        ("b.jsonl", "\n\n"),
        ("c.json", " "),
        ("d.json", "[]"),
        ("e.csv", ""),
        ("f.csv", "prompt,chosen,rejected\n"),
    ],
)
def test_empty_files_are_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=name.replace(".", r"\.") + r": .*(empty|no rows)"):
        list(read_rows(str(path)))


def test_non_utf8_jsonl_names_line_and_byte_offset(tmp_path):
    path = tmp_path / "data.jsonl"
    first = (json.dumps(ROWS[0]) + "\n").encode()
    path.write_bytes(first + b'{"prompt": "caf\xe9"}\n')
    offset = len(first) + len(b'{"prompt": "caf')
    with pytest.raises(DataError, match=rf"row 2: not valid UTF-8: byte 0xe9 on line 2 \(byte offset {offset}\)"):
        list(read_rows(str(path)))


def test_non_utf8_json_array_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"prompt": "ok"},\n{"prompt": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"data\.json: not valid UTF-8: byte 0xe9 on line 3"):
        list(read_rows(str(path)))


@pytest.mark.parametrize("content", ['["just a string"]', '{"prompt": "x"}\n[1, 2]\n'])
def test_row_that_is_not_an_object_is_an_error(tmp_path, content):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=r"row \d: row is not a JSON object \(found (str|list)\)"):
        list(read_rows(str(path)))


def test_csv_row_with_wrong_number_of_fields(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\na,b\n")
    with pytest.raises(DataError, match=r"row 2: has 2 fields but the header has 3"):
        list(read_rows(str(path)))


def test_missing_local_file_says_not_found(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))


def test_missing_path_that_looks_like_a_hub_id_says_the_hub_failed(monkeypatch):
    def unreachable_hub(path, split):
        raise ConnectionError("Couldn't reach 'someone/some-prefs' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable_hub)
    with pytest.raises(DataError) as caught:
        read_rows("someone/some-prefs")
    message = str(caught.value)
    assert message.startswith("someone/some-prefs: file not found")
    assert "Hugging Face Hub dataset id" in message and "hub could not be reached" in message
    assert "ConnectionError" in message


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type"):
        read_rows(str(path))


def test_corrupt_gzip_is_an_error(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"data\.jsonl\.gz: cannot read file"):
        list(read_rows(str(path)))
