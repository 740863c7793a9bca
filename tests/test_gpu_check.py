"""bench/gpu_check.sh: its arguments, its exit status, and its --dry-run (everything but the CUDA work).

Each dry run leaves the slow parts out through GPU_CHECK_SKIP so the file stays near a minute on 2 cores:
the run without wheels (a fresh clone's case) collects the GPU tests, the run with the wheels installs them into
a temporary target with the GPU machine's cp312 tags and runs the FSDP2 part's commands on CPU, which must PASS.
The CPU bench (part 3) is left out here: it trains three child processes (about a minute on its own); `bash
bench/gpu_check.sh --dry-run` runs it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
WHEELS = ROOT / ".whl"


def _check(tmp_path: Path, *args: str, timeout: int = 240, **env: str) -> tuple[int, str, str]:
    """Run the script; returns (exit status, its output, summary.txt)."""
    out = tmp_path / "out"
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    environment.pop("OUT", None)
    result = subprocess.run(
        ["bash", str(SCRIPT), *args, str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=timeout,
    )
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    return result.returncode, result.stdout + result.stderr, summary


def test_arguments_are_checked(tmp_path):
    rc, text, _ = _check(tmp_path, "--bogus")
    assert rc == 2 and "unknown option --bogus" in text
    result = subprocess.run(["bash", str(SCRIPT), "a", "b"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "one OUT_DIR at most" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "--dry-run" in result.stdout and "GPU_CHECK_SKIP" in result.stdout
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_failed_part_makes_the_exit_status_1(tmp_path):
    """An interpreter under which dpokit cannot import: FAIL, status 1, the later parts not run."""
    broken = tmp_path / "python"
    broken.write_text(f'#!/bin/sh\nexec {sys.executable} -c \'raise SystemExit("no torch here")\' "$@"\n')
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    rc, text, summary = _check(tmp_path, "--dry-run", PYTHON=str(broken), GPU_CHECK_WHEELS=str(empty))
    assert rc == 1, text
    assert "FAIL: imports: dpokit does not import" in summary and "== 1." not in summary


def test_dry_run_without_wheels_skips_the_install(tmp_path):
    """A fresh clone has no .whl: the install is a SKIP with its reason, not a failure; the GPU tests are collected."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    rc, text, summary = _check(tmp_path, "--dry-run", GPU_CHECK_WHEELS=str(empty), GPU_CHECK_SKIP="fsdp2 bench")
    assert rc == 0, text
    assert f"SKIP: install: no wheels in {empty}/" in summary
    assert "PASS: imports: dpokit and dpokit.cli" in summary
    assert "(carried)" not in summary  # nothing came from a target folder
    assert (
        "PASS: collected 5 GPU tests (dry run: not run)" in summary
    )  # 2 attention backends, fsdp2 + deepspeed_zero3, qlora
    assert "SKIP: fsdp2: left out by GPU_CHECK_SKIP" in summary and "SKIP: bench: left out by GPU_CHECK_SKIP" in summary
    assert "FAIL" not in summary and "status 0" in summary


@pytest.mark.skipif(
    not any(WHEELS.glob("*.whl")),
    reason="no .whl/ here (a fresh clone has none): bash bench/gpu_wheels.sh fetches them",
)
def test_dry_run_installs_the_wheels_and_runs_fsdp2_on_cpu(tmp_path):
    rc, text, summary = _check(tmp_path, "--dry-run", GPU_CHECK_SKIP="pytest bench")
    assert rc == 0, text
    assert "PASS: install: " in summary
    for name in (
        "trl",
        "datasets",
        "bitsandbytes",
    ):  # imported from the temporary target, ahead of the interpreter's own
        assert any(line.startswith(f"  {name}: ") and line.endswith("(carried)") for line in summary.splitlines()), (
            summary
        )
    assert "unmet requirements of carried wheels: none" in summary
    part2 = summary.split("== 2. FSDP2")[1].split("== 3.")[0]  # train.fsdp exists: the part must run and PASS, no SKIP
    assert "PASS: (CPU, gloo) 5 steps, sharded checkpoint-3, resumed run's final weights equal" in part2, summary
    assert "SKIP" not in part2 and "FAIL" not in part2, summary
    target = (
        next(line for line in summary.splitlines() if line.startswith("PASS: install: ")).split(" into ")[1].split()[0]
    )
    assert target != "/tmp/site" and not Path(target).exists()  # a temporary target, removed at the end
