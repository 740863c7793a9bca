"""The one gateway for every file a user or a data row names: checked before a byte is read.

Every input dpokit reads (data files, prompt and sample files, eval files, scorer modules, config
files, images named inside rows) is opened here, so one set of rules holds everywhere:

- only a regular file is read: a device (/dev/zero), a FIFO, a socket is refused, a symlink is
  followed first and judged by what it points at; the file is opened non-blocking and checked on
  its descriptor (fstat), so a FIFO cannot hang the open and a swap after the check changes nothing;
- each kind of input has a documented size limit (`KINDS`), checked before reading, and a read
  never goes past it even if the file grows (or a .gz stream inflates) while it is read;
- JSON lines are streamed: a reader can stop after N rows without parsing the rest, and one line
  is at most `MAX_LINE_BYTES` (a 10 GB file of zeros is one "line": refused at the limit, not read
  into memory).

Errors are `InputError`s, one line naming the file (and row/field when known); the CLI prints them
as `dpokit: error: ...` with exit status 2. Paths named inside data rows (images) go through
`resolve_row_path`, which keeps them inside the data file's folder or the allowed roots.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import os
import stat
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from dpokit.inputs.json_text import loads_bounded

GiB = 1024**3
MiB = 1024**2


class InputError(ValueError):
    """A user-facing problem with an input file; the message names the file, row and field."""

    def __init__(self, message: str, path: str = "", row: int | None = None, field: str | None = None):
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.row, self.field, self.reason = str(path), row, field, message


@dataclass(frozen=True)
class InputKind:
    """What a kind of input is, and the most bytes dpokit reads of one (documented in docs/robustness.md)."""

    name: str
    limit: int  # bytes on disk, and bytes after decompression
    what: str


# The limits are far above any real file of the kind, and far below what takes a machine down.
KINDS: dict[str, InputKind] = {
    k.name: k
    for k in (
        InputKind("data", 200 * GiB, "training, eval, SFT-mix, retention and prompt data (streamed)"),
        InputKind("whole_data", 8 * GiB, "data read whole before parsing (.json, .csv)"),
        InputKind("samples", 200 * GiB, "samples, scored samples and pairs JSONL of the online verbs (streamed)"),
        InputKind("suite", 256 * MiB, "eval suite files (IFEval prompts, multi-turn questions)"),
        InputKind("config", 1_000_000, "YAML config files"),
        InputKind("module", 16 * MiB, "Python scorer files (path/to/file.py:function)"),
        InputKind("image", 64 * MiB, "image files named in data rows"),
        InputKind("run", 4 * GiB, "a run directory's own files read back (metrics.jsonl, config.yaml, summaries)"),
        InputKind(
            "model_json", 64 * MiB, "a model folder's config.json and tokenizer_config.json, checked before loading"
        ),
        InputKind("docs", 16 * MiB, "a docs page rewritten between its markers (python -m dpokit.robustness --write)"),
    )
}

MAX_LINE_BYTES = 64 * MiB  # one JSON line; a row over this is a file of zeros, not a preference pair (nor an image row)
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; checked from the header, before the pixels are decoded


def _size_text(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _kind(kind: str) -> InputKind:
    return KINDS[kind]


def open_checked(path: str | os.PathLike, kind: str, label: str = "") -> BinaryIO:
    """Open `path` for reading as binary, after the gateway's checks; InputError if it may not be read.

    `label` names the option or key that gave the path (e.g. "--in"), for the message.
    """
    spec = _kind(kind)
    shown = f"{label} {path}" if label else str(path)
    local = os.path.expanduser(os.fspath(path))
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever.
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError("file not found (no such file or folder)", shown) from None
    except PermissionError:
        raise InputError("cannot be read: permission denied", shown) from None
    except OSError as error:
        raise InputError(f"cannot be opened: {error.strerror or error}", shown) from None
    except ValueError:  # an embedded NUL byte: no file has that name
        raise InputError("not a file name (it holds a NUL byte)", shown.replace("\x00", "\\0")) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError("is a folder, not a file", shown)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(
                f"not a regular file but {_file_type(info.st_mode)}; reading it may never end: give a file", shown
            )
        if info.st_size > spec.limit:
            raise InputError(
                f"is {_size_text(info.st_size)}, over the {_size_text(spec.limit)} limit for {spec.what}", shown
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        raw = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return _Capped(raw, spec, shown)


def _file_type(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def is_inside(path: str, root: str) -> bool:
    """Whether the real path `path` lies in the real folder `root` (both already resolved)."""
    return os.path.commonpath([path, root]) == root


def read_json(path: str | os.PathLike, kind: str, label: str = "", within: str | os.PathLike | None = None):
    """A whole JSON file, parsed with a bounded depth (JSONTooDeep), after the gateway's checks (InputError).

    `within`: a folder the file must lie in once links are resolved, for a file dpokit names inside a folder of
    its own (a pipeline's round files): a link out of it is refused like a row's path out of its data folder.
    """
    shown = f"{label} {path}" if label else str(path)
    if within is not None and not is_inside(os.path.realpath(path), os.path.realpath(within)):
        raise InputError(f"leads outside {within} (a link?); dpokit reads only its own files there", shown)
    return loads_bounded(read_text(path, kind, label))  # malformed JSON: json's own ValueError, as json.loads


def check_file(path: str | os.PathLike, kind: str, label: str = "") -> str:
    """The gateway's checks without reading: returns the path when it may be read, else InputError."""
    with open_checked(path, kind, label):
        return os.fspath(path)


class _Capped(io.RawIOBase):
    """A reader that raises InputError instead of returning more than the kind's limit (a file that grows)."""

    def __init__(self, raw: BinaryIO, spec: InputKind, shown: str):
        self._raw, self._left, self._spec, self._shown = raw, spec.limit, spec, shown

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._left -= n
            if self._left < 0:
                raise InputError(
                    f"read past the {_size_text(self._spec.limit)} limit for {self._spec.what}", self._shown
                )
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def read_bytes(path: str | os.PathLike, kind: str, label: str = "") -> bytes:
    """The whole file (decompressed if it ends in .gz), within the kind's limit."""
    try:
        with _stream(path, kind, label) as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:  # a truncated or non-gzip .gz, a read error
        raise InputError(f"cannot read file: {error}", f"{label} {path}" if label else str(path)) from None


def read_text(path: str | os.PathLike, kind: str, label: str = "") -> str:
    """The whole file as UTF-8 text (strict: a bad byte is an error naming its offset), BOM removed."""
    data = read_bytes(path, kind, label)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InputError(
            f"not valid UTF-8: byte 0x{data[error.start]:02x} on line {line} (byte offset "
            f"{error.start}); re-save the file as UTF-8",
            f"{label} {path}" if label else str(path),
        ) from None


def _stream(path: str | os.PathLike, kind: str, label: str = "") -> BinaryIO:
    """A buffered binary stream of the file's content, gunzipped for .gz, capped at the kind's limit."""
    raw = io.BufferedReader(open_checked(path, kind, label))
    if not os.fspath(path).lower().endswith(".gz"):
        return raw
    # The cap applies to the inflated bytes too: 10 MB of gzip can hold 10 GB of zeros.
    spec = _kind(kind)
    return io.BufferedReader(_Capped(_GzipOwningFile(raw), spec, f"{label} {path}" if label else str(path)))


class _GzipOwningFile(gzip.GzipFile):
    """GzipFile over a stream it owns: closing it closes the file too (GzipFile(fileobj=...) leaves it open)."""

    def __init__(self, raw: BinaryIO):
        super().__init__(fileobj=raw, mode="rb")
        self._owned = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._owned.close()


def iter_lines(path: str | os.PathLike, kind: str, label: str = "") -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw bytes) of each line, streamed; a line over MAX_LINE_BYTES is an InputError."""
    shown = f"{label} {path}" if label else str(path)
    try:
        with _stream(path, kind, label) as stream:
            for number, line in enumerate(iter(lambda: stream.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(line) > MAX_LINE_BYTES:
                    raise InputError(
                        f"line {number} is longer than {_size_text(MAX_LINE_BYTES)} (no line break); "
                        "this is not a JSON lines file",
                        shown,
                        row=number,
                    )
                yield number, line
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"cannot read file: {error}", shown) from None


def iter_jsonl(path: str | os.PathLike, kind: str, label: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, streamed; a line that is not a JSON object is an InputError."""
    from dpokit.inputs.json_text import loads_bounded

    shown = f"{label} {path}" if label else str(path)
    for number, raw in iter_lines(path, kind, label):
        if not raw.strip():
            continue
        try:
            value = loads_bounded(raw.decode("utf-8").removeprefix("\ufeff"))
        except UnicodeDecodeError:
            raise InputError("not valid UTF-8; re-save the file as UTF-8", shown, row=number) from None
        except ValueError as error:  # JSONDecodeError, JSONTooDeep
            raise InputError(f"not JSON ({str(error)[:100]})", shown, row=number) from None
        if not isinstance(value, dict):
            raise InputError(f"not a JSON object (found {type(value).__name__})", shown, row=number)
        yield number, value
