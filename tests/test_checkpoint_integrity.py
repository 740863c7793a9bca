"""A damaged checkpoint is never resumed from, and a full disk stops a run cleanly (issue 15).

Before: 4,000 bytes overwritten inside checkpoint-N/model.safetensors resumed with exit 0 and a
final model holding 1,000 NaNs; a truncated optimizer file stopped with "cannot resume"; a full
disk while checkpointing gave a traceback from _write_optimizer. Now every checkpoint carries
manifest.json (blake2b of each file), a damaged or truncated one is moved aside and the previous
one resumed, and a full disk stops with one line (exit 2) leaving the earlier checkpoints as they were.

Every test starts from a copy of one run crashed during step 8: checkpoints 3 and 6 on disk.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import struct
from pathlib import Path

import os

import pytest
import torch
import yaml

import dpokit
import dpokit.training.checkpoint
import dpokit.training.loop
from dpokit.cli import main as cli_main
from dpokit.training.checkpoint import CheckpointError, list_checkpoints
from dpokit.training.manifest import MANIFEST, damage
from test_resume import _assert_same_weights, _config, _fail_on_call, _weights

pytestmark = pytest.mark.slow  # tiny-model training runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Holds the data file, the crashed run and the copies; one data path, so every copy resumes."""
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def crashed(root) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        _fail_on_call(patch, dpokit.training.loop, "accumulate_gradients", call=8)
        with pytest.raises(RuntimeError, match="simulated crash"):
            dpokit.train(_config(root, "crashed"))
    assert [p.name for p in list_checkpoints(root / "crashed")] == ["checkpoint-3", "checkpoint-6"]
    return root / "crashed"


@pytest.fixture(scope="module")
def uninterrupted(root) -> Path:
    return dpokit.train(_config(root, "uninterrupted")).run_dir


def _copy(root: Path, crashed: Path, name: str) -> dict:
    shutil.copytree(crashed, root / name)
    return _config(root, name)


def _config_file(cfg: dict) -> str:
    path = Path(cfg["out_dir"]).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _overwrite_with_nans(file: Path, n_bytes: int) -> None:
    """Overwrite n_bytes in the middle of a safetensors file's tensor data with float32 NaNs (the issue's corruption)."""
    raw = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + header_len
    start = data_start + ((len(raw) - data_start) // 2 // 4) * 4
    raw[start : start + n_bytes] = struct.pack("<f", float("nan")) * (n_bytes // 4)
    file.write_bytes(bytes(raw))


def _fallback_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "is damaged" in line]


def test_a_fresh_checkpoint_has_a_manifest_of_every_file_and_passes_it(crashed):
    for path in list_checkpoints(crashed):
        files = json.loads((path / MANIFEST).read_text())["files"]
        assert set(files) == {p.name for p in path.iterdir() if p.name != MANIFEST}
        assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= set(files)
        assert all(entry["bytes"] == (path / name).stat().st_size for name, entry in files.items())
        assert damage(path) is None


def test_nans_written_into_the_latest_weights_fall_back_to_the_previous_checkpoint(
    root, crashed, uninterrupted, capsys
):
    cfg = _copy(root, crashed, "nan-weights")
    run_dir = Path(cfg["out_dir"])
    _overwrite_with_nans(run_dir / "checkpoints" / "checkpoint-6" / "model.safetensors", 4000)
    capsys.readouterr()
    dpokit.train(cfg)
    out = capsys.readouterr().out
    [line] = _fallback_lines(out)
    assert (
        "checkpoint-6" in line
        and "model.safetensors: checksum mismatch" in line
        and "resuming from checkpoint-3 instead" in line
    )
    assert "resumed from" in out and "checkpoint-3 at step 3" in out
    final = _weights(run_dir)
    assert all(torch.isfinite(t).all() for t in final.values())
    _assert_same_weights(final, _weights(uninterrupted))  # step 3 -> 10 exactly as the uninterrupted run
    aside = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".corrupt-checkpoint-6-")]
    assert len(aside) == 1 and aside[0] in line  # kept for inspection, and step 6 was written afresh
    assert damage(run_dir / "checkpoints" / "checkpoint-10") is None


def test_a_truncated_optimizer_file_falls_back_the_same_way(root, crashed, uninterrupted, capsys):
    cfg = _copy(root, crashed, "truncated-optimizer")
    run_dir = Path(cfg["out_dir"])
    file = run_dir / "checkpoints" / "checkpoint-6" / "optimizer.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    dpokit.train(cfg)
    [line] = _fallback_lines(capsys.readouterr().out)
    assert f"optimizer.safetensors: {size // 2:,} bytes, {size:,} when written (truncated)" in line
    assert "resuming from checkpoint-3 instead" in line
    _assert_same_weights(_weights(run_dir), _weights(uninterrupted))


def test_checkpoints_without_a_manifest_still_resume_not_verified_and_truncation_is_still_caught(
    root, crashed, uninterrupted, capsys
):
    cfg = _copy(root, crashed, "legacy")
    run_dir = Path(cfg["out_dir"])
    for path in list_checkpoints(run_dir):
        (path / MANIFEST).unlink()  # as written before this change
    file = run_dir / "checkpoints" / "checkpoint-6" / "optimizer.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 100)
    capsys.readouterr()
    dpokit.train(cfg)
    out = capsys.readouterr().out
    [line] = _fallback_lines(out)
    assert "optimizer.safetensors" in line and "(truncated)" in line and "resuming from checkpoint-3 instead" in line
    assert "checkpoint-3 has no manifest.json" in out and "not verified" in out
    _assert_same_weights(_weights(run_dir), _weights(uninterrupted))


def test_with_no_intact_checkpoint_left_the_run_stops_with_exit_2_and_keeps_them_and_a_named_one_is_not_swapped(
    root, crashed, capsys
):
    cfg = _copy(root, crashed, "all-damaged")
    run_dir = Path(cfg["out_dir"])
    for path in list_checkpoints(run_dir):
        _overwrite_with_nans(path / "model.safetensors", 4000)
    capsys.readouterr()
    assert cli_main(["train", _config_file(cfg)]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("dpokit: error: no intact checkpoint in") and "train.resume=never" in line
    assert "checkpoint-6: model.safetensors: checksum mismatch" in line and "checkpoint-3: model.safetensors" in line
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-3", "checkpoint-6"]  # nothing deleted
    assert not (run_dir / "final").exists()
    named = run_dir / "checkpoints" / "checkpoint-6"  # a checkpoint named explicitly is not swapped for another
    with pytest.raises(CheckpointError, match=r"the checkpoint is damaged \(model.safetensors: checksum mismatch\)"):
        dpokit.train({**cfg, "train": {**cfg["train"], "resume": str(named)}})


def _assert_stopped_cleanly(run_dir: Path, err: str) -> str:
    [line] = [line for line in err.splitlines() if line.strip()]  # one line, no traceback
    assert line.startswith("dpokit: error: not enough disk space for checkpoint-6 in ")
    assert str(run_dir / "checkpoints") in line and "the previous checkpoint checkpoint-3 is intact" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-3"]  # no .tmp-checkpoint-6
    assert damage(run_dir / "checkpoints" / "checkpoint-3") is None
    return line


def _needed_and_free(line: str) -> tuple[int, int]:
    needed, free = re.search(r"needs about ([\d,]+) bytes .*?, ([\d,]+) bytes .*? were free", line).groups()
    return int(needed.replace(",", "")), int(free.replace(",", ""))


def test_too_little_free_space_stops_before_writing_with_one_line_and_exit_2(root, crashed, monkeypatch, capsys):
    cfg = _config(root, "no-space")
    run_dir = Path(cfg["out_dir"])
    real = shutil.disk_usage

    def after_the_first_checkpoint(path):  # checkpoint-3 fits; then the disk is nearly full
        usage = real(path)
        return usage._replace(free=10_000) if (run_dir / "checkpoints" / "checkpoint-3").is_dir() else usage

    monkeypatch.setattr(shutil, "disk_usage", after_the_first_checkpoint)
    capsys.readouterr()
    assert cli_main(["train", _config_file(cfg)]) == 2
    line = _assert_stopped_cleanly(run_dir, capsys.readouterr().err)
    assert "nothing was written" in line
    needed, free = _needed_and_free(line)
    on_disk = sum(p.stat().st_size for p in (run_dir / "checkpoints" / "checkpoint-3").iterdir())
    assert free == 10_000 and on_disk <= needed <= on_disk + (
        2 << 20
    )  # the estimate covers the checkpoint, with little slack


def test_a_disk_that_fills_up_while_writing_the_optimizer_stops_the_same_way(root, crashed, monkeypatch, capsys):
    cfg = _config(root, "enospc")
    run_dir = Path(cfg["out_dir"])
    original, calls = dpokit.training.checkpoint._write_optimizer, []

    def disk_full_at_the_second(*args, **kwargs):
        calls.append(1)
        original(*args, **kwargs)
        if len(calls) == 2:  # checkpoint-6, its optimizer file half written
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dpokit.training.checkpoint, "_write_optimizer", disk_full_at_the_second)
    capsys.readouterr()
    assert cli_main(["train", _config_file(cfg)]) == 2
    line = _assert_stopped_cleanly(run_dir, capsys.readouterr().err)
    assert "the disk filled up while writing it (No space left on device); the partial folder was removed" in line


@pytest.mark.parametrize("kind", ["fifo", "device", "outside"])
def test_a_checkpoint_file_that_is_a_fifo_a_device_or_a_link_outside_is_refused_in_one_line(tmp_path, kind):
    """The checkpoint's JSON files go through the input gateway: a FIFO or /dev/zero in place of trainer_state.json is
    refused at once (never a hang, never read until memory runs out); a link to a file outside is read as the file it
    names, and the manifest (checked before any resume) is what ties the folder's files together."""
    from dpokit.training.checkpoint import STATE_FILE, read_state

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    state = folder / STATE_FILE
    if kind == "fifo":
        os.mkfifo(state)
    elif kind == "device":
        state.symlink_to("/dev/zero")
    else:
        outside = tmp_path / "elsewhere.json"
        outside.write_text('{"step": 3}')
        state.symlink_to(outside)
        assert read_state(folder).step == 3
        return
    with pytest.raises(CheckpointError, match="not a complete dpokit checkpoint"):
        read_state(folder)
