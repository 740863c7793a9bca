"""The input gateway: every file a user or a data row names is checked and read here (docs/robustness.md)."""

from dpokit.inputs.gateway import (
    KINDS,
    MAX_IMAGE_PIXELS,
    MAX_LINE_BYTES,
    InputError,
    check_file,
    iter_jsonl,
    is_inside,
    iter_lines,
    open_checked,
    read_bytes,
    read_json,
    read_text,
)
from dpokit.inputs.json_text import MAX_JSON_DEPTH, JSONTooDeep, UnreadableJSON, loads_bounded
from dpokit.inputs.row_paths import RowPathError, check_image_bytes, read_row_image, resolve_row_path

__all__ = [
    "KINDS",
    "MAX_IMAGE_PIXELS",
    "MAX_JSON_DEPTH",
    "MAX_LINE_BYTES",
    "InputError",
    "JSONTooDeep",
    "RowPathError",
    "UnreadableJSON",
    "check_file",
    "check_image_bytes",
    "iter_jsonl",
    "is_inside",
    "iter_lines",
    "loads_bounded",
    "open_checked",
    "read_bytes",
    "read_json",
    "read_row_image",
    "read_text",
    "resolve_row_path",
]
