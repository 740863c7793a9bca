"""The run directory has one owner: a folder dpokit made, written by one run at a time.

    .dpokit-run.json       the marker: dpokit made this folder (written when a run first claims it)
    .dpokit.lock           {"pid", "host", "started"}: the run writing into it now, which holds flock() on it
                           (the kernel frees it when the run ends, however); removed on a normal exit
    earlier-eval-<time>/   eval.json (dpokit eval --out RUN/eval.json) of a model a new run replaces

`claim` is the one way into a run directory (dpokit train and sft, and so the pipeline's round runs);
dpokit eval --out into a run directory holds its lock while it runs (`holding`). It refuses a folder holding files dpokit did not write (listing a
few) unless train.overwrite=true: a user's folder lost final/my_weights.bin and had its config.yaml and
metrics.jsonl overwritten without a word. It takes the lock: two runs writing into one folder mixed
their metrics.jsonl records and one died with a FileNotFoundError. The lock of a run that ended
without releasing it (SIGKILL) is free, and taken over with a note naming its PID. `RunDir.abandon` undoes a claim whose run failed
its config or data checks, so a failed check leaves no out_dir behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from dpokit.config import Config, ConfigError, resolve_paths
from dpokit.training.checkpoint import list_checkpoints
from dpokit.version import __version__

MARKER = ".dpokit-run.json"
LOCK = ".dpokit.lock"
EVAL_FILES = ("eval.json", "eval.md", "eval.samples.jsonl")  # what `dpokit eval --out RUN/eval.json` writes
# Every top-level name dpokit writes into a run directory (the loop, resume, export, report, trackers, eval --out).
# In a marked folder these are dpokit's; anything else there, or anything at all in an unmarked folder, is not.
RUN_NAMES = frozenset(
    {
        "config.yaml",
        "data_summary.json",
        "metrics.jsonl",
        ".metrics.jsonl.tmp",
        "report.html",
        "checkpoints",
        "final",
        ".tmp-final",
        "tensorboard",
        "wandb",
        ".config.yaml.tmp",
        MARKER,
        LOCK,
        *EVAL_FILES,
    }
)
RUN_PREFIXES = (".deleting-final-", "earlier-eval-")
_SHOWN = 4  # foreign entries named in the refusal


@dataclass
class RunDir:
    """A claimed run directory; `release` (any exit) or `abandon` (a failed setup) gives it back."""

    path: Path
    created: bool  # this claim made the folder: abandoning it removes it again
    held: bool = True  # this process holds its lock
    lock_fd: Optional[int] = None  # the open lock file this process holds flock() on

    def ready(self, run):
        """The run passed its checks: an earlier model's eval.json is set aside now (not by a run that then failed)."""
        if self.held:
            set_aside_evaluation(self.path)
        return run

    def release(self) -> None:
        if self.held:
            self.held = False
            if self.lock_fd is not None:  # unlinked while still held, so no other run can take this inode's lock
                (self.path / LOCK).unlink(missing_ok=True)
                os.close(self.lock_fd)
                self.lock_fd = None

    def abandon(self) -> None:
        """The run stopped before training (a config or data check failed): a folder this claim made is removed."""
        self.release()
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)

    def save_config(self, cfg: Config, adjustments: list[str]) -> None:
        """config.yaml: the config that ran, after every automatic adjustment (each said in a comment), paths resolved,
        so `dpokit train RUN/config.yaml` repeats the run from any directory."""
        header = ""
        if adjustments:
            header = "# dpokit changed these settings before training; the values below are the ones that ran\n"
            header += "".join(f"# adjusted: {note}\n" for note in adjustments)
        _write_atomically(
            self.path / "config.yaml", header + yaml.safe_dump(resolve_paths(cfg).to_dict(), sort_keys=False)
        )


def claim(
    path,
    overwrite: bool,
    key: str = "out_dir",
    names: frozenset = RUN_NAMES,
    prefixes: tuple = RUN_PREFIXES,
    was_ours: Callable[[Path], bool] = lambda p: bool(list_checkpoints(p)),
) -> RunDir:
    """Make or take `path` for one run: marker, ownership check, lock. ConfigError (one line) when it is not ours to write.

    `names`, `prefixes`: the top-level entries dpokit writes in this kind of folder (a run directory, a pipeline
    folder); `was_ours`: how a folder dpokit wrote before it marked folders is recognised (a run: a checkpoint).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is a file, not a folder")
    created = not path.exists()
    foreign = [] if created else foreign_entries(path, names, prefixes, was_ours)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        raise ConfigError(
            f"{key}={str(path)!r} holds files dpokit did not write ({shown}); nothing was written: use another "
            f"{key}, or train.overwrite=true to write into it anyway (dpokit's files there are replaced)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _take_lock(path, key)
        if not (path / MARKER).is_file():
            _write_atomically(
                path / MARKER,
                json.dumps(
                    {"format": 1, "made_by": f"dpokit {__version__}", "created": time.strftime("%Y-%m-%d %H:%M:%S")}
                )
                + "\n",
            )
    except OSError as e:
        raise ConfigError(f"{key}={str(path)!r}: cannot write the run directory: {e}") from None
    return RunDir(path, created, lock_fd=lock_fd)


def foreign_entries(
    path: Path,
    names: frozenset = RUN_NAMES,
    prefixes: tuple = RUN_PREFIXES,
    was_ours: Callable[[Path], bool] = lambda p: bool(list_checkpoints(p)),
) -> list[str]:
    """Top-level entries of `path` that dpokit did not write ("final/" for a folder), sorted.

    A folder without the marker is dpokit's only when it holds a checkpoint and nothing but dpokit's names:
    a run directory written before dpokit marked them, which must still resume.
    """
    entries = sorted(path.iterdir())
    ours = [e for e in entries if e.name in names or e.name.startswith(prefixes)]
    if not (path / MARKER).is_file() and not (len(ours) == len(entries) and was_ours(path)):
        ours = []
    return [e.name + ("/" if e.is_dir() else "") for e in entries if e not in ours]


def set_aside_evaluation(path: Path) -> Optional[Path]:
    """A new run replaces the model `dpokit eval --out RUN/eval.json` measured: its files move to earlier-eval-<time>/,
    so the report never shows them as this run's."""
    found = [path / name for name in EVAL_FILES if (path / name).is_file()]
    if not found:
        return None
    aside = path / f"earlier-eval-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for file in found:
        os.replace(file, aside / file.name)
    print(f"[dpokit] {path}: eval.json measured the model of an earlier run; moved to {aside.name}/", flush=True)
    return aside


@contextlib.contextmanager
def holding(path: Optional[Path], key: str):
    """The lock of a dpokit run directory (one with the marker) for the `with` block: another command writing into
    it (dpokit eval --out RUN/eval.json) waits for no run and lets none start; ConfigError if a run holds it.
    Any other folder (or None) is not dpokit's to lock: nothing is taken."""
    if path is None or not (Path(path) / MARKER).is_file():
        yield
        return
    owner = RunDir(Path(path), created=False, lock_fd=_take_lock(Path(path), key))
    try:
        yield
    finally:
        owner.release()


# --- the lock ----------------------------------------------------------------------------------
# flock() on .dpokit.lock, held for the whole run: the kernel releases it when the process ends, however it
# ends (SIGKILL included), so a dead run's lock is free by itself and no two runs can both decide to take it
# over (unlinking a stale lock file raced: a second taker could remove the first one's new lock). The JSON in
# the file only names the holder for the error message and the takeover note.


def _take_lock(path: Path, key: str) -> int:
    """The open, flock()ed lock file of `path` (its descriptor); ConfigError naming the holder when a live run has it."""
    lock = path / LOCK
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{key}={str(path)!r} {_held_by(path, _read_lock(lock) or {})}: wait for it to end, "
                f"or use another {key}"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder unlinked it between our open and flock: take the new file instead
            os.close(fd)
            continue
        holder = _read_lock(lock)
        if holder and holder.get("pid") != os.getpid():
            print(
                f"[dpokit] {path}: the run that held it (PID {holder.get('pid')}) is no longer running; its lock is "
                "taken over",
                flush=True,
            )
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode(),
            0,
        )
        return fd
    raise ConfigError(f"{key}={str(path)!r}: other runs keep taking its lock; use another {key}")


def _held_by(path: Path, holder: dict) -> str:
    return f"is in use by another dpokit run (PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')})"


def _read_lock(lock: Path) -> Optional[dict]:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
