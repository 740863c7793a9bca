"""Read raw data rows from local files, saved `datasets` folders, or the Hugging Face Hub.

Every source is reduced to the same stream of ``(row_number, row_dict)`` pairs,
with row numbers starting at 1, so that skip reports and error messages can
point the user at the exact place to look: the line number for JSON lines, the
position in the array / data row (header excluded) / dataset index otherwise.

Corrupt input (a bad JSON line, bytes that are not UTF-8, a row that is not an
object, an empty file, a broken gzip stream) raises `DataError` instead of being
skipped: a damaged file should be fixed, not half-trained on. Row *content*
problems (a missing or empty field) are the layout converter's business.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from typing import Any, Iterable, Iterator

from dpokit.data.records import DataError
from dpokit.inputs import InputError, check_file, iter_lines, loads_bounded, read_bytes

Row = tuple[int, dict]

LOCAL_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")
# "name" or "owner/name"; anything with a data-file suffix is treated as a missing file instead.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATASETS_BATCH_ROWS = 1000


def read_rows(path: str, split: str = "train") -> Iterator[Row]:
    """Yield ``(row_number, row)`` for every row of `path`, whatever its storage.

    `split` selects a split in `DatasetDict.save_to_disk` folders and in
    `datasets.load_dataset` sources; a single file or a `Dataset.save_to_disk`
    folder holds one set of rows and is read whole. Source-level problems (not
    found, unsupported type, unknown split) raise at call time; problems inside
    the file raise while iterating.
    """
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        saved_markers = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset.save_to_disk
        if any(os.path.isfile(os.path.join(local, marker)) for marker in saved_markers):
            return _read_saved_dataset(local, split)
        return _read_with_load_dataset(local, split, from_hub=False)
    if os.path.lexists(local):  # a file, or a device, FIFO, socket or dangling link the gateway refuses
        return _read_local_file(local)
    if _looks_like_hub_id(path):
        return _read_with_load_dataset(path, split, from_hub=True)
    raise DataError("file not found (no such file or folder)", path)


def _looks_like_hub_id(path: str) -> bool:
    lowered = path.lower()
    return bool(_HUB_ID.match(path)) and not lowered.endswith(LOCAL_FORMATS + (".gz", ".txt"))


def _read_local_file(path: str) -> Iterator[Row]:
    try:
        check_file(path, "data")  # refused at call time, before any reader starts (docs/robustness.md)
    except InputError as error:
        raise DataError(error.reason, path) from None
    lowered = path.lower()
    if lowered.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(path)
    if lowered.endswith((".json", ".json.gz")):
        return _read_json(path)
    if lowered.endswith((".csv", ".csv.gz")):
        return _read_csv(path)
    if lowered.endswith(".parquet"):
        return _read_parquet(path)
    supported = ", ".join(LOCAL_FORMATS)
    raise DataError(f"unsupported file type; expected one of {supported}, or a datasets folder", path)


# --- bytes and text -------------------------------------------------------------------------


def _byte_lines(path: str) -> Iterator[bytes]:
    """Lines of the file as raw bytes, streamed through the input gateway (gunzipped for .gz)."""
    try:
        for _, line in iter_lines(path, "data"):
            yield line
    except InputError as error:
        raise DataError(error.reason, path, row=error.row) from None


def _read_all_bytes(path: str) -> bytes:
    """A .json or .csv file is parsed whole: its own, lower size limit (the gateway's whole_data kind)."""
    try:
        return read_bytes(path, "whole_data")
    except InputError as error:
        raise DataError(error.reason, path) from None


def _decode_utf8(data: bytes, path: str, line_number: int | None = None, line_start: int = 0) -> str:
    """Decode strictly: silently replacing bad bytes would corrupt training text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = line_number if line_number is not None else data.count(b"\n", 0, error.start) + 1
        offset = line_start + error.start
        raise DataError(
            f"not valid UTF-8: byte 0x{data[error.start]:02x} on line {line} (byte offset {offset}); "
            "re-save the file as UTF-8",
            path,
            row=line_number,
        ) from None


def _unreadable(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "values nested too deeply (thousands of levels of [ or {)"
    if "digits" in str(error):
        return "a number has more digits than Python reads (over 4300); quote it as a string"
    return str(error)


def _as_row(value: Any, path: str, row_number: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"row is not a JSON object (found {type(value).__name__})", path, row=row_number)
    return value


# --- JSON and JSON lines --------------------------------------------------------------------


def _read_jsonl(path: str) -> Iterator[Row]:
    yield from _parse_json_lines(_byte_lines(path), path)


def _parse_json_lines(lines: Iterable[bytes], path: str) -> Iterator[Row]:
    """One JSON object per line; blank lines are not rows and are passed over."""
    found_row = False
    line_start = 0
    for line_number, raw in enumerate(lines, 1):
        text = _decode_utf8(raw, path, line_number, line_start)
        line_start += len(raw)
        if line_number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            value = loads_bounded(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"line {line_number} is not valid JSON ({error.msg} at column {error.colno})", path, row=line_number
            ) from None
        except (ValueError, RecursionError) as error:  # absurd nesting, or an integer with thousands of digits
            raise DataError(f"line {line_number} cannot be read: {_unreadable(error)}", path, row=line_number) from None
        found_row = True
        yield line_number, _as_row(value, path, line_number)
    if not found_row:
        raise DataError("file is empty (no rows)", path)


def _read_json(path: str) -> Iterator[Row]:
    """A JSON array of rows, an object holding one list of rows, or JSON lines in a .json file."""
    data = _read_all_bytes(path)
    text = _decode_utf8(data, path).removeprefix("\ufeff")
    if not text.strip():
        raise DataError("file is empty (no rows)", path)
    is_json_lines = False
    try:
        document = loads_bounded(text)
    except json.JSONDecodeError as error:
        # A complete first value followed by more text is JSON lines saved as .json.
        if error.msg != "Extra data":
            raise DataError(f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}", path) from None
        is_json_lines = True
    except (ValueError, RecursionError) as error:  # absurd nesting, or an integer with thousands of digits
        raise DataError(f"cannot be read: {_unreadable(error)}", path) from None
    if is_json_lines:
        yield from _parse_json_lines(io.BytesIO(data), path)
        return
    rows = _rows_of_document(document, path)
    for row_number, value in enumerate(rows, 1):
        yield row_number, _as_row(value, path, row_number)


def _rows_of_document(document: Any, path: str) -> list:
    expected = (
        "expected a JSON array of row objects, JSON lines, "
        'or an object holding one list of rows such as {"data": [...]}'
    )
    if isinstance(document, dict):
        # {"data": [...], "version": 2} is a wrapper; {"conversations": [...], "chosen": {...}} is one row.
        list_keys = [key for key, value in document.items() if isinstance(value, list)]
        holds_objects = any(isinstance(value, dict) for value in document.values())
        if len(list_keys) != 1 or holds_objects:
            raise DataError(f"{expected}; found an object with keys {', '.join(map(str, document)) or '(none)'}", path)
        document = document[list_keys[0]]
    if not isinstance(document, list):
        raise DataError(f"{expected}; found a JSON {type(document).__name__}", path)
    if not document:
        raise DataError("file is empty (no rows)", path)
    return document


# --- CSV ------------------------------------------------------------------------------------


def _read_csv(path: str) -> Iterator[Row]:
    """Header row then data rows; row 1 is the first data row. Values stay strings."""
    text = _decode_utf8(_read_all_bytes(path), path).removeprefix("\ufeff")
    # Long completions easily exceed the csv module's 128 KiB default field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise DataError("file is empty (no header row)", path)
        if len(set(header)) != len(header):
            raise DataError(f"header has repeated column names: {', '.join(header)}", path)
        row_number = 0
        for values in reader:
            if not values:  # a blank line, not a row
                continue
            row_number += 1
            if len(values) != len(header):
                raise DataError(
                    f"has {len(values)} fields but the header has {len(header)} (line {reader.line_num})",
                    path,
                    row=row_number,
                )
            yield row_number, dict(zip(header, values))
    except csv.Error as error:
        raise DataError(f"not valid CSV near line {reader.line_num}: {error}", path) from None
    if row_number == 0:
        raise DataError("file has a header but no rows", path)


# --- parquet and datasets -------------------------------------------------------------------


def _read_parquet(path: str) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"not a readable parquet file: {error}", path) from None
    if parquet_file.metadata.num_rows == 0:
        raise DataError("file is empty (no rows)", path)
    row_number = 0
    for batch in parquet_file.iter_batches(batch_size=_DATASETS_BATCH_ROWS):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row


def _read_saved_dataset(path: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:  # any failure here means the folder cannot be used as data
        raise DataError(f"cannot read the saved dataset folder: {type(error).__name__}: {error}", path) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split {split!r} not found; available splits: {', '.join(loaded)}", path)
        loaded = loaded[split]
    return _dataset_rows(loaded, path)


def _read_with_load_dataset(path: str, split: str, from_hub: bool) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as error:  # network, missing dataset, bad split, unreadable files
        if from_hub:
            message = (
                "file not found (no such file or folder); it looks like a Hugging Face Hub dataset id, "
                "but it could not be loaded from the hub (the hub could not be reached, or the dataset "
                f"or split does not exist): {type(error).__name__}: {error}"
            )
        else:
            message = f"cannot load the folder with datasets.load_dataset: {type(error).__name__}: {error}"
        raise DataError(message, path) from None
    return _dataset_rows(dataset, path)


def _dataset_rows(dataset: Any, path: str) -> Iterator[Row]:
    if len(dataset) == 0:
        raise DataError("dataset is empty (no rows)", path)
    return _iterate_dataset(dataset.with_format(None))


def _iterate_dataset(dataset: Any) -> Iterator[Row]:
    """Batched reads: row-by-row access to an Arrow-backed dataset is much slower."""
    row_number = 0
    for batch in dataset.iter(batch_size=_DATASETS_BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            row_number += 1
            yield row_number, dict(zip(names, values))
