"""Every input of every verb against hostile files: the table of docs/robustness.md, generated, and its check.

For each entry of the gateway's list (dpokit/inputs/catalog.py) and each case below, the real code
path that reads that input (`READERS`) is run on a hostile file and its outcome recorded: refused
with which one-line message, or counted as a skipped row. tests/test_robustness.py runs the whole
table (and fails on a traceback, a hang, or a read that succeeds); `python -m dpokit.robustness
--write docs/robustness.md` rewrites the page between its markers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from dpokit.inputs import InputError, read_text
from dpokit.inputs.catalog import INPUTS, Input

SUFFIX = {
    "config": ".yaml",
    "data": ".jsonl",
    "whole_data": ".json",
    "samples": ".jsonl",
    "suite": ".jsonl",
    "module": ".py",
    "image": ".png",
    "run": ".jsonl",
}


def _make_cases(folder: Path, suffix: str) -> dict[str, Path]:
    """Hostile inputs with the file name an entry expects; `outside` lies beyond the data folder."""
    data = folder / "data"
    data.mkdir(exist_ok=True)
    fifo, link, sparse, locked = (data / f"{name}{suffix}" for name in ("fifo", "to_device", "sparse", "locked"))
    for path in (fifo, link, sparse, locked):
        if os.path.lexists(path):
            os.unlink(path)
    os.mkfifo(fifo)
    os.symlink("/dev/zero", link)
    sparse.touch()
    os.truncate(sparse, 10 * 1024**3)  # 10 GB of zeros that take no disk: the size check, then the line cap
    locked.write_text("{}\n")
    os.chmod(locked, 0)
    outside = folder / f"outside{suffix}"
    outside.write_text("{}\n")
    return {
        "device": Path("/dev/zero"),
        "FIFO": fifo,
        "symlink to a device": link,
        "10 GB sparse file": sparse,
        "unreadable file": locked,
        "path outside the data folder": Path("../") / outside.name,
    }


CASES = (
    "device",
    "FIFO",
    "symlink to a device",
    "10 GB sparse file",
    "unreadable file",
    "path outside the data folder",
)


def _readers() -> dict[str, Callable[[Path, Path], str | None]]:
    """reader name -> fn(path, data folder) running the code a verb uses; returns a note for a non-error outcome."""
    from dpokit.config import load_config, load_pipeline_config
    from dpokit.config.loading import read_config_mapping
    from dpokit.data.loading import read_rows
    from dpokit.data.rows import RowSkip
    from dpokit.data.vision import row_image_bytes
    from dpokit.online.sampling import read_samples
    from dpokit.online.scoring import load_function
    from dpokit.online.suites.ifeval import load_ifeval
    from dpokit.online.suites.multiturn import load_questions
    from dpokit.report.run_data import run_file_text

    def image(path: Path, folder: Path) -> str | None:
        try:
            row_image_bytes(str(path), str(folder))
        except RowSkip as skip:
            return f"row skipped and counted: {skip.reason}"
        return None

    def run_dir(path: Path, folder: Path) -> str | None:
        notes: list[str] = []
        run_file_text(path, notes)
        return f"a note on the page: {notes[0]}" if notes else None

    return {
        "config": lambda p, f: load_config(str(p)) and None,
        "config_from": lambda p, f: read_config_mapping(p) and None,
        "pipeline_config": lambda p, f: load_pipeline_config(str(p)) and None,
        "rows": lambda p, f: list(read_rows(str(p))) and None,
        "samples": lambda p, f: read_samples(p, must_exist=True) and None,
        "scorer": lambda p, f: load_function(f"{p}:score") and None,
        "ifeval": lambda p, f: load_ifeval(p) and None,
        "multiturn": lambda p, f: load_questions(p) and None,
        "run_dir": run_dir,
        "image": image,
    }


def outcome(entry: Input, case: str, path: Path, folder: Path, timeout: float = 60.0) -> tuple[str, str]:
    """(verdict, one-line message): verdict is refused, skipped, noted, read (a failure), hangs or crashes."""
    from dpokit.config import ConfigError
    from dpokit.inputs import InputError
    from dpokit.online.scorer import ScoringError

    if case == "path outside the data folder" and entry.reader != "image":
        return "n/a", "a path the user names is theirs to name; only paths inside data rows are confined"
    if case == "unreadable file" and os.geteuid() == 0:
        return _as_other_user(entry, path, folder, timeout)
    result: list[tuple[str, str]] = []

    def run() -> None:
        try:
            note = _readers()[entry.reader](folder / path if not path.is_absolute() else path, folder)
            result.append(("skipped" if note and note.startswith("row") else "noted", note) if note else ("read", ""))
        except (InputError, ConfigError, ScoringError) as error:
            message = str(error)
            result.append(("refused" if "\n" not in message else "crashes", message))
        except BaseException as error:  # a traceback the user would see
            result.append(("crashes", f"{type(error).__name__}: {error}"[:300]))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else ("hangs", f"no answer within {timeout:g} s")


def _as_other_user(entry: Input, path: Path, folder: Path, timeout: float) -> tuple[str, str]:
    """root reads any file, so the unreadable case runs in a forked child that has become `nobody`."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the child)
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            verdict, message = outcome(entry, "unreadable (as nobody)", path, folder, timeout)
            os.write(write_end, f"{verdict}\t{message}".encode()[:4000])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode(errors="replace")
    os.waitpid(child, 0)
    verdict, _, message = text.partition("\t")
    return (verdict, message) if verdict else ("crashes", "the check's child process died")


def table(folder: Path | None = None) -> list[tuple[Input, str, str, str]]:
    """(entry, case, verdict, message) for every entry and case."""
    folder = Path(folder or tempfile.mkdtemp(prefix="dpokit-robustness-"))
    folder.chmod(0o755)  # the unreadable case runs as nobody, who must reach the folder to be refused the file
    rows = []
    for entry in INPUTS:
        cases = _make_cases(folder, SUFFIX[entry.kind])
        for case in CASES:
            verdict, message = outcome(entry, case, cases[case], folder / "data")
            rows.append((entry, case, verdict, message))
    return rows


_REASONS = (
    ("not a regular file", "not a regular file"),
    ("longer than", "line over the line cap"),
    ("permission denied", "permission denied"),
    ("outside the data folder", "outside the data folder"),
    ("limit for", "over the size limit"),
    ("No module named", "not an importable module"),
)


def cell(verdict: str, message: str) -> str:
    """A table cell: the verdict and the reason in a few words (the full messages: `python -m dpokit.robustness`)."""
    if verdict == "n/a":
        return "n/a"
    reason = next((short for key, short in _REASONS if key in message), message[:60])
    return f"{verdict}: {reason}"


def markdown(rows: list[tuple[Input, str, str, str]]) -> str:
    header = "| verbs | input | kind | " + " | ".join(CASES) + " |"
    lines = [header, "|" + "---|" * (3 + len(CASES))]
    by_entry: dict[Input, dict[str, str]] = {}
    for entry, case, verdict, message in rows:
        by_entry.setdefault(entry, {})[case] = cell(verdict, message)
    for entry, cells in by_entry.items():
        lines.append(
            f"| {', '.join(entry.verbs)} | `{entry.name}` | {entry.kind} | "
            + " | ".join(cells[case] for case in CASES)
            + " |"
        )
    return "\n".join(lines)


BEGIN, END = "<!-- robustness table: begin (python -m dpokit.robustness --write) -->", "<!-- robustness table: end -->"


def main(argv: list[str]) -> int:
    """Print the table (--full: every message), or rewrite it between the markers of a page (--write PAGE)."""
    page = old = None
    if argv[:1] == ["--write"]:  # the page first, through the gateway: a wrong PAGE fails before the 30 s table
        page = Path(argv[1])
        old = read_text(page, "docs", "--write")
        if BEGIN not in old or END not in old:
            raise InputError(f"holds no robustness table markers ({BEGIN} ... {END})", str(page))
    folder = Path(tempfile.mkdtemp(prefix="dpokit-robustness-"))
    try:
        rows = table(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if argv[:1] == ["--full"]:
        for entry, case, verdict, message in rows:
            print(f"{entry.name} | {case} | {verdict} | {message.replace(str(folder), 'DIR')}")
    elif page is not None:
        start, end = old.index(BEGIN) + len(BEGIN), old.index(END)
        page.write_text(old[:start] + "\n" + markdown(rows) + "\n" + old[end:])
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
