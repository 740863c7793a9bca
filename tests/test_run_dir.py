"""The run directory has one owner (issue 20.2): dpokit marks out_dir, refuses a folder of someone else's files,
lets one run at a time write into it, writes final/ as safely as a checkpoint, leaves nothing behind a failed
check, saves the config that ran (adjusted, paths resolved) and never shows a stale evaluation.

Each "Found" case of the issue is a test below; each failed on the code before the fix.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dpokit
import dpokit.training.export
import dpokit.training.loop
from dpokit.cli import main as cli_main
from dpokit.training.checkpoint import list_checkpoints
from dpokit.training.manifest import damage
from dpokit.training.run_dir import LOCK, MARKER
from test_resume import _assert_same_weights, _fail_on_call, _launch_slow, _wait_for_step, _weights
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

pytestmark = pytest.mark.slow  # tiny-model training runs

STEPS = 2


def _config(tmp_path: Path, name: str, data: str | None = None, **extra) -> dict:
    path = tmp_path / "train.jsonl"
    if not path.exists():
        write_jsonl(path, synthetic_pairs(16, seed=1))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": data or str(path), "max_length": 32, "max_prompt_length": 16},
        "loss": {"beta": 0.5},
        "optim": {"lr": 3e-3},
        "train": {"batch_size": 8, "max_steps": STEPS, "logging_steps": 1, "save_steps": STEPS, "progress_bar": False},
        "out_dir": str(tmp_path / name),
    }
    for key, value in extra.items():
        section, field = key.split(".")
        cfg.setdefault(section, {})[field] = value
    return cfg


def _config_file(cfg: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _one_error_line(err: str) -> str:
    [line] = [line for line in err.splitlines() if line.strip()]  # one line, no traceback
    assert line.startswith("dpokit: error: ")
    return line


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_user_files_is_refused_in_one_line_and_left_as_it_was(tmp_path, capsys):
    # Found: an existing folder of user files lost final/my_weights.bin; its config.yaml, metrics.jsonl,
    # data_summary.json and report.html were overwritten without a word.
    folder = tmp_path / "mine"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "my_weights.bin").write_bytes(b"weights the user trained elsewhere")
    for name in ("config.yaml", "metrics.jsonl", "data_summary.json", "report.html"):
        (folder / name).write_text(f"the user's own {name}\n")
    before = _tree(folder)
    cfg = _config(tmp_path, "mine")
    capsys.readouterr()
    assert cli_main(["train", _config_file(cfg, tmp_path / "my.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(folder) in line and "train.overwrite=true" in line
    assert "config.yaml" in line and "final/" in line  # a few of the files it did not write, named
    assert _tree(folder) == before  # nothing written, nothing deleted

    assert cli_main(["train", _config_file(cfg, tmp_path / "my.yaml"), "train.overwrite=true"]) == 0  # the user said so
    assert (folder / MARKER).is_file() and (folder / "final" / "config.json").is_file()


def test_a_fresh_out_dir_is_marked_and_a_rerun_resumes_it(tmp_path, capsys):
    cfg = _config(tmp_path, "run")
    dpokit.train(cfg)
    run_dir = Path(cfg["out_dir"])
    assert (run_dir / MARKER).is_file() and not (run_dir / LOCK).exists()  # the lock went with the run
    capsys.readouterr()
    dpokit.train(_config(tmp_path, "run", **{"train.max_steps": STEPS + 2}))  # the same out_dir, two more steps
    assert "resumed from" in capsys.readouterr().out


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_first_runs_pid(tmp_path, capsys):
    # Found: two concurrent runs mixed their metrics.jsonl records, and one died with a FileNotFoundError traceback.
    cfg = _config(tmp_path, "run", **{"train.max_steps": 40, "train.save_steps": 0})
    first = _launch_slow(tmp_path, cfg, delay=0.3)
    try:
        _wait_for_step(Path(cfg["out_dir"]), first, 1)
        metrics_before = (Path(cfg["out_dir"]) / "metrics.jsonl").read_text().splitlines()[:1]
        capsys.readouterr()
        assert cli_main(["train", _config_file(cfg, tmp_path / "second.yaml")]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"PID {first.pid}" in line and "in use" in line
        assert (Path(cfg["out_dir"]) / "metrics.jsonl").read_text().splitlines()[:1] == metrics_before  # not restarted
    finally:
        first.kill()
        first.communicate()


def test_the_lock_goes_on_any_exit_and_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, "run")
    run_dir = Path(cfg["out_dir"])
    _fail_on_call(monkeypatch, dpokit.training.loop, "accumulate_gradients", call=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dpokit.train(cfg)
    monkeypatch.undo()
    assert run_dir.is_dir() and not (run_dir / LOCK).exists()  # released on an exception too

    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a PID that ran and is dead now, as after a SIGKILL
    gone.wait()
    (run_dir / LOCK).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "started": "earlier"}))
    capsys.readouterr()
    dpokit.train(cfg)
    out = capsys.readouterr().out
    assert f"PID {gone.pid}" in out and "no longer running" in out
    assert (run_dir / "final" / "config.json").is_file() and not (run_dir / LOCK).exists()


def test_a_full_disk_while_writing_final_stops_in_one_line_and_the_rerun_writes_it_from_the_checkpoint(
    tmp_path, monkeypatch, capsys
):
    # Found: disk full while writing final/ gave a traceback and left .tmp-final; the rerun said "holds a finished
    # run", deleted the only checkpoint and retrained from scratch.
    cfg = _config(tmp_path, "run")
    run_dir = Path(cfg["out_dir"])

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dpokit.training.export, "write_card", disk_full)  # after the weights went into .tmp-final
    capsys.readouterr()
    assert cli_main(["train", _config_file(cfg, tmp_path / "run.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not enough disk space for final" in line and f"checkpoint-{STEPS} is intact" in line
    assert not (run_dir / ".tmp-final").exists() and not (run_dir / "final").exists()
    [checkpoint] = list_checkpoints(run_dir)
    assert damage(checkpoint) is None
    trained = _weights_of(checkpoint)

    monkeypatch.undo()
    capsys.readouterr()
    assert cli_main(["train", _config_file(cfg, tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "holds a finished run" not in out and "final/ is missing" in out
    assert list_checkpoints(run_dir) == [checkpoint]  # the last intact copy of the trained weights is kept
    _assert_same_weights(_weights(run_dir), trained)  # final/ is the checkpoint's model, not a retrained one
    assert [r["step"] for r in _records(run_dir) if "loss" in r] == list(range(1, STEPS + 1))  # no step trained twice


def test_too_little_space_for_final_is_said_before_writing_it(tmp_path, monkeypatch, capsys):
    cfg = _config(tmp_path, "run")
    run_dir = Path(cfg["out_dir"])
    real = dpokit.training.export.shutil.disk_usage

    def full_after_the_checkpoint(path):  # checkpoint-2 fits; then the disk is nearly full
        usage = real(path)
        return usage._replace(free=1000) if list_checkpoints(run_dir) else usage

    monkeypatch.setattr(dpokit.training.export.shutil, "disk_usage", full_after_the_checkpoint)
    capsys.readouterr()
    assert cli_main(["train", _config_file(cfg, tmp_path / "run.yaml")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not enough disk space for final" in line and "1,000 bytes" in line and "nothing was written" in line
    assert not (run_dir / ".tmp-final").exists() and len(list_checkpoints(run_dir)) == 1


def test_failed_config_and_data_checks_leave_no_out_dir(tmp_path, capsys):
    # Found: a failed check left an out_dir holding a config.yaml.
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "the film", "chosen": "", "rejected": ""}] * 4
    )  # nothing to learn from
    assert cli_main(["train", _config_file(_config(tmp_path, "no-data", data=str(bad)), tmp_path / "a.yaml")]) == 2
    assert not (tmp_path / "no-data").exists()
    no_checkpoint = _config(tmp_path, "no-checkpoint", **{"train.resume": str(tmp_path / "nowhere")})
    assert (
        cli_main(["train", _config_file(no_checkpoint, tmp_path / "b.yaml")]) == 2
    )  # refused after the model is loaded
    assert not (tmp_path / "no-checkpoint").exists()
    assert "dpokit: error: " in capsys.readouterr().err


def test_config_yaml_is_the_config_that_ran_with_its_adjustments_and_the_report_shows_it(tmp_path):
    # Found: a run that switched to a live reference still recorded speed.ref_cache: true, and the report showed that.
    cfg = _config(tmp_path, "sync", **{"loss.ref_sync_steps": 1})
    dpokit.train(cfg)
    run_dir = Path(cfg["out_dir"])
    text = (run_dir / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["speed"]["ref_cache"] is False
    assert "# adjusted: loss.ref_sync_steps=1" in text and "speed.ref_cache is off" in text
    report = (run_dir / "report.html").read_text()
    assert "ref_cache: false" in report and "ref_cache: true" not in report


def test_the_saved_config_repeats_the_run_from_any_directory(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    write_jsonl(project / "prefs.jsonl", synthetic_pairs(16, seed=1))
    cfg = _config(tmp_path, "x", data="prefs.jsonl")
    cfg["out_dir"] = "runs/x"
    my_yaml = _config_file(cfg, project / "my.yaml")
    monkeypatch.chdir(project)
    assert cli_main(["train", "my.yaml"]) == 0  # relative paths: from the current directory
    run_dir = project / "runs" / "x"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["path"] == str(project / "prefs.jsonl") and saved["out_dir"] == str(run_dir)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli_main(["train", str(run_dir / "config.yaml"), f"train.max_steps={STEPS + 1}"]) == 0
    assert "resumed from" in capsys.readouterr().out and not (elsewhere / "runs").exists()

    # Found: `cd elsewhere && dpokit train dir/my.yaml` failed with "prefs.jsonl: file not found".
    assert cli_main(["train", my_yaml]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "data.path='prefs.jsonl'" in line and str(elsewhere) in line and str(project / "prefs.jsonl") in line
    assert "current directory" in line
    assert not (elsewhere / "runs").exists()


def test_an_earlier_models_eval_json_is_moved_aside_when_a_new_run_starts(tmp_path, capsys):
    cfg = _config(tmp_path, "run")
    dpokit.train(cfg)
    run_dir = Path(cfg["out_dir"])
    (run_dir / "eval.json").write_text(
        json.dumps({"mean_score": 0.123456, "win_rate": 0.987})
    )  # dpokit eval --out RUN/eval.json
    capsys.readouterr()
    dpokit.train(_config(tmp_path, "run", **{"train.max_steps": STEPS + 1}))  # the model changes
    out = capsys.readouterr().out
    assert not (run_dir / "eval.json").exists()
    [aside] = [p for p in run_dir.iterdir() if p.name.startswith("earlier-eval-")]
    assert json.loads((aside / "eval.json").read_text())["win_rate"] == 0.987 and aside.name in out
    assert "98.7%" not in (run_dir / "report.html").read_text()  # the report shows no stale evaluation


def _weights_of(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_a_run_that_fails_its_checks_leaves_the_earlier_eval_in_place(tmp_path):
    cfg = _config(tmp_path, "run")
    dpokit.train(cfg)
    run_dir = Path(cfg["out_dir"])
    (run_dir / "eval.json").write_text(json.dumps({"win_rate": 0.987}))
    with pytest.raises(Exception):  # refused after the model is loaded: the run never replaced the model
        dpokit.train(_config(tmp_path, "run", **{"train.resume": str(tmp_path / "nowhere")}))
    assert json.loads((run_dir / "eval.json").read_text())["win_rate"] == 0.987
    assert not [p for p in run_dir.iterdir() if p.name.startswith("earlier-eval-")]


def test_the_lock_is_the_kernels_flock_so_only_a_holding_process_counts(tmp_path, capsys):
    """A lock file naming a live PID that holds no flock (the PID was reused after a SIGKILL) is free: taken over with
    a note; a process holding the flock, however its file reads, keeps the folder."""
    cfg = _config(tmp_path, "run")
    run_dir = Path(cfg["out_dir"])
    run_dir.mkdir()
    (run_dir / MARKER).write_text("{}")
    (run_dir / LOCK).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "started": "earlier"}))
    dpokit.train(cfg)
    assert f"PID {os.getppid()}" in capsys.readouterr().out and not (run_dir / LOCK).exists()

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | "
            "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(run_dir / LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_main(["train", _config_file(cfg, tmp_path / "again.yaml")]) == 2
        assert "in use by another dpokit run" in _one_error_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: the folder is free again
    dpokit.train(_config(tmp_path, "run", **{"train.max_steps": STEPS + 1}))


def test_eval_out_into_a_run_directory_holds_its_lock_and_waits_for_no_run(tmp_path, capsys):
    """dpokit eval --out RUN/eval.json takes the run directory's lock: refused while a run holds it (before any model
    loads), and a run cannot start there while an evaluation writes into it."""
    from dpokit.training.run_dir import holding

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / MARKER).write_text("{}")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | "
            "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(run_dir / LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli_main(
            [
                "eval",
                "--policy",
                str(tmp_path / "no-such-model"),
                "--suite",
                "ifeval",
                "--out",
                str(run_dir / "eval.json"),
            ]
        )
        assert code == 2 and "in use by another dpokit run" in _one_error_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()
    with holding(run_dir, "--out"):  # an evaluation writing into it: a run is refused
        assert cli_main(["train", _config_file(_config(tmp_path, "run"), tmp_path / "t.yaml")]) == 2
        assert "in use by another dpokit run" in _one_error_line(capsys.readouterr().err)
    assert not (run_dir / LOCK).exists()
