"""`dpokit report`: one self-contained HTML page per run, from a real tiny run and crafted histories.

The page is checked twice: as text (what it says, that it loads nothing from
outside and has no script) and as rendered by a real headless Chromium (the DOM
after parsing holds the charts' SVG paths, the config and the diagnoses; the
console stays silent; a screenshot is drawn). Chromium tests skip when
/usr/bin/chromium is missing (Debian: apt-get install -y chromium).
Set DPOKIT_REPORT_SCREENSHOTS=DIR to keep the screenshots for a look.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import dpokit
from dpokit.report import build_report, load_run
from dpokit.report.__main__ import main as report_main
from dpokit.report.svg import Chart, Series, fmt, line_chart, nice_ticks
from report_histories import (
    default_summary, demo_config, drifting_records, healthy_records, kto_records, stopped_records, with_diagnoses,
    write_run,
)  # fmt: skip
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

CHROMIUM = Path("/usr/bin/chromium")
ALL_CHARTS = {
    "loss",
    "rewards",
    "margins",
    "accuracies",
    "logps",
    "kl",
    "entropy",
    "lengths",
    "learning_rate",
    "grad_norm",
    "throughput",
}


def charts(html: str) -> set[str]:
    return set(re.findall(r'<svg class="chart" data-chart="([^"]+)"', html))


def series(html: str) -> dict[str, str]:
    """data-series -> the path's d attribute, for every drawn series."""
    return dict(re.findall(r'<path class="series" data-series="([^"]+)" d="([^"]+)"', html))


def assert_self_contained(html: str) -> None:
    assert "<script" not in html.lower()
    assert not re.search(r"https?://|<link|<img|<iframe|@import|url\(", html, re.IGNORECASE)


# --- crafted histories ------------------------------------------------------------------------


def test_healthy_run_reads_healthy_with_every_chart(tmp_path):
    run_dir = write_run(
        tmp_path / "run", with_diagnoses(healthy_records()), config=demo_config(), summary=default_summary()
    )
    path = build_report(run_dir)
    html = path.read_text()
    assert path == run_dir / "report.html"
    assert_self_contained(html)
    assert 'id="verdict">healthy<' in html
    assert charts(html) == ALL_CHARTS
    drawn = series(html)
    assert {
        "loss",
        "eval_loss",
        "rewards/chosen",
        "eval_rewards/rejected",
        "kl/chosen",
        "learning_rate",
        "grad_norm",
        "eval_mean_length",
        "tokens_per_second",
    } <= set(drawn)
    assert '<div class="label">tokens/s</div>' in html and '<div class="label">MFU</div>' in html
    assert all(d.startswith("M") and d.count("L") > 1 for d in drawn.values())
    assert 'id="notes"' not in html  # nothing missing, nothing to explain
    assert "The failure detectors found nothing" in html and "were replayed over the logged metrics" in html
    assert "max_grad_norm: 1.0" in html and "prompt_chosen_rejected" in html and "empty chosen" in html


def test_recorded_warnings_are_listed_with_markers_and_shared_advice_once(tmp_path):
    records = with_diagnoses(drifting_records())
    recorded = [r["diagnosis"] for r in records if "diagnosis" in r]
    html = build_report(
        write_run(tmp_path / "run", records, config=demo_config(), summary=default_summary())
    ).read_text()
    run = load_run(tmp_path / "run")
    assert run.verdict == "warnings" and run.diagnoses_source == "recorded" and run.diagnoses == recorded
    assert 'id="verdict">warnings<' in html
    assert html.count('<article class="card diag warn">') == len(recorded)
    assert {"kl_drift", "length_drift", "eval_loss_rising"} <= {d["mode"] for d in recorded}
    # KL chart: the 5 and 10 nats thresholds and a marker at each kl_drift step
    kl_svg = re.search(r'<svg class="chart" data-chart="kl".*?</svg>', html).group(0)
    assert "5 nats" in kl_svg and "10 nats" in kl_svg
    assert kl_svg.count('class="marker"') == sum(d["mode"] == "kl_drift" for d in recorded)
    # over-optimisation advice is shared by three modes: printed in full once, then referred to
    assert html.count("Use early stopping based on evaluation metrics") == 1
    assert "same as for kl_drift above" in html


def test_without_recorded_diagnoses_the_detectors_are_replayed(tmp_path):
    run = load_run(write_run(tmp_path / "run", drifting_records(), config=demo_config(), summary=default_summary()))
    assert run.diagnoses_source == "replayed"
    assert "kl_drift" in {d["mode"] for d in run.diagnoses} and run.verdict == "warnings"


def test_a_stopped_run_shows_the_stop_and_marks_the_nan(tmp_path):
    run_dir = write_run(
        tmp_path / "run",
        with_diagnoses(stopped_records()),
        config=demo_config(),
        summary=default_summary(),
        final=False,
    )
    html = build_report(run_dir).read_text()
    assert 'id="verdict">stopped<' in html and "Stopped at step 24: non_finite" in html
    assert '<article class="card diag stop">' in html
    assert 'class="nonfinite"' in html  # the null loss is drawn as a cross on the axis, not as 0
    assert "no final/ model" not in html  # expected for a stopped run: not a note


def test_skipped_updates_are_listed_and_a_shared_step_is_not_a_resume(tmp_path):
    """The trainer skips an update on a NaN (a skipped_step record), and on too many it logs the offending
    values at the step it already logged, then the non_finite stop."""
    records = [r for r in healthy_records(20, 2, 10) if r["step"] <= 12]

    def skip(step):
        return {
            "step": step,
            "skipped_step": {"reason": "non-finite loss", "loss": None, "grad_norm": 3.0},
            "skipped_steps": 1,
        }

    records[3:3] = [skip(7)]
    records.append(skip(12))
    records.append({"step": 12, "loss": None, "grad_norm": None, "skipped_steps": 2})
    run_dir = write_run(tmp_path / "run", with_diagnoses(records), config=demo_config(), final=False)
    run = load_run(run_dir)
    assert [d["step"] for d in run.skipped] == [7, 12]
    assert not any("resumed" in note for note in run.notes)
    assert run.verdict == "stopped" and run.diagnoses[-1]["mode"] == "non_finite"
    html = build_report(run_dir).read_text()
    assert 'id="skipped"' in html and "2 optimizer update(s) skipped" in html
    loss_svg = re.search(r'<svg class="chart" data-chart="loss".*?</svg>', html).group(0)
    assert loss_svg.count("update skipped at step") == 2
    healthy_but_skipped = write_run(tmp_path / "run2", records[:4], config=demo_config())
    assert load_run(healthy_but_skipped).verdict == "warnings"
    assert '<p class="meta">1 optimizer update(s) skipped' in build_report(healthy_but_skipped).read_text()


def test_missing_files_and_keys_give_notes_not_a_crash(tmp_path):
    """A KTO run (no margins, KL is `kl`), without eval, config, data summary or final model, cut mid-line."""
    run_dir = write_run(tmp_path / "run", kto_records(), final=False, cut_last_line=True)
    html = build_report(run_dir).read_text()
    assert_self_contained(html)
    notes = load_run(run_dir).notes
    for expected in (
        "no config.yaml",
        "no data_summary.json",
        "not JSON objects (line 20)",
        "no eval records",
        "no final/",
    ):
        assert any(expected in note for note in notes), expected
    assert charts(html) == ALL_CHARTS - {"margins", "lengths", "entropy", "throughput"}
    assert "no rewards/margins logged" in html and "set train.eval_generate=N" in html
    assert "not logged in this run (runs from before throughput metrics)" in html
    assert "kl" in series(html) and not any(k.startswith("eval_") for k in series(html))
    assert "No resolved config" in html and "No data summary" in html


def test_an_empty_run_directory_and_a_missing_one(tmp_path):
    (tmp_path / "empty").mkdir()
    html = build_report(tmp_path / "empty", out=tmp_path / "elsewhere" / "r.html").read_text()
    assert 'id="verdict">no metrics<' in html and "no metrics.jsonl" in html and not charts(html)
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        build_report(tmp_path / "nope")


def test_nan_literals_null_gaps_and_a_resumed_run(tmp_path):
    records = healthy_records(20, 2, 10)
    train = {r["step"]: r for r in records if "loss" in r}
    train[4]["loss"] = float("nan")  # json.dumps writes NaN; the trainer writes null: both break the line
    train[8]["loss"] = None
    resumed = [dict(r) for r in healthy_records(20, 2, 10) if r["step"] >= 12]  # restarted from a step-10 checkpoint
    run = load_run(write_run(tmp_path / "run", records + resumed, config=demo_config()))
    train_steps = [r["step"] for r in run.train]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 20
    assert any("resumed at step 12" in note for note in run.notes)
    html = build_report(tmp_path / "run").read_text()
    assert series(html)["loss"].count("M") == 3  # two gaps -> three runs of line: [2], [6], [10 ... 20]
    assert html.count('<path class="nonfinite"') == 2


def test_config_text_is_escaped(tmp_path):
    config = demo_config()
    config["data"]["path"] = "<script>alert(1)</script>.jsonl"
    html = build_report(write_run(tmp_path / "run", healthy_records(), config=config)).read_text()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;.jsonl" in html


def test_svg_helpers():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(-0.93, 0.31) == [-0.5, 0.0]
    assert [fmt(v) for v in (0, 5e-6, 0.6931, 12.0, 250000.0)] == ["0", "5e-6", "0.693", "12", "2.5e5"]
    assert [fmt(v) for v in (999.4, 1839.4, -1839.4, 12345.0)] == ["999", "1840", "-1840", "12300"]
    flat = line_chart(Chart("c", [Series("x", "x", [(1, 2.0), (2, 2.0)], "#000")]))  # a flat line gets a range
    assert 'data-series="x" d="M' in flat and "nan" not in flat.lower()
    single = line_chart(Chart("c", [Series("x", "x", [(5, 1.0)], "#000")]))  # one point: a dot, not nothing
    assert '<circle class="dot"' in single


def test_python_m_entry_point(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", healthy_records(), config=demo_config())
    assert report_main([str(run_dir), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").is_file() and "x.html" in capsys.readouterr().out
    assert report_main([str(tmp_path / "missing")]) == 2


def test_cli_report_verb(tmp_path, capsys):
    from dpokit.cli import main

    run_dir = write_run(tmp_path / "run", healthy_records(), config=demo_config())
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err


# --- a real tiny run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny-run")
    train = write_jsonl(tmp / "train.jsonl", synthetic_pairs(64, seed=1))
    held_out = write_jsonl(tmp / "eval.jsonl", synthetic_pairs(16, seed=2))
    result = dpokit.train(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": {"path": str(train), "eval_path": str(held_out), "max_length": 32, "max_prompt_length": 16},
            "loss": {"beta": 0.5},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"batch_size": 8, "max_steps": 12, "logging_steps": 2, "eval_steps": 4, "progress_bar": False},
            "speed": {"ref_cache": False},  # a live reference, so kl/chosen is logged and charted
            "out_dir": str(tmp / "run"),
        }
    )
    return result.run_dir


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tiny_run):
    html = build_report(tiny_run).read_text()
    assert_self_contained(html)
    run = load_run(tiny_run)
    assert run.verdict in ("healthy", "warnings") and run.last_step == 12 and not run.notes
    # no eval_generate: lengths are explained, not drawn; throughput: drawn once the loop hook logs tokens_per_second
    assert charts(html) == ALL_CHARTS - {"lengths"}
    drawn = series(html)
    paired = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl/chosen")
    for key in paired + ("learning_rate", "grad_norm"):
        assert drawn[key].count("L") == 5, key  # 6 logged steps: 2, 4, ..., 12
    for key in paired:
        assert drawn["eval_" + key].count("L") == 2, key  # evaluations at steps 4, 8 and the final one at 12
    summary = json.loads((tiny_run / "data_summary.json").read_text())
    assert f">{summary['train']['rows_read']}<" in html
    assert "beta: 0.5" in html


# --- in a real browser ------------------------------------------------------------------------


@pytest.fixture()
def chromium():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (Debian: apt-get install -y chromium)")
    return CHROMIUM


def browse(chromium: Path, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a local file, with no network chatter and the console logged to stderr."""
    command = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_console_capture_works(chromium, tmp_path):
    """The control for the no-console-errors checks below: a page with a JS error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom'); notDefined();</script>")
    messages = console_messages(browse(chromium, page, tmp_path / "profile", "--dump-dom").stderr)
    assert any("boom" in m for m in messages) and any("notDefined" in m for m in messages)


@pytest.mark.parametrize("kind", ["healthy", "warnings", "missing", "real"])
def test_report_renders_in_chromium(chromium, tmp_path, kind, request):
    if kind == "real":
        run_dir = request.getfixturevalue("tiny_run")
    elif kind == "missing":
        run_dir = write_run(tmp_path / kind, kto_records(), final=False, cut_last_line=True)
    else:
        records = healthy_records() if kind == "healthy" else drifting_records()
        run_dir = write_run(tmp_path / kind, with_diagnoses(records), config=demo_config(), summary=default_summary())
    page = build_report(run_dir, out=tmp_path / f"{kind}.html")
    done = browse(chromium, page, tmp_path / "profile", "--dump-dom")
    dom = done.stdout
    assert console_messages(done.stderr) == []
    assert len(charts(dom)) >= 7 and all(d.startswith("M") for d in series(dom).values())
    assert 'id="diagnostics"' in dom and 'id="curves"' in dom and 'id="data"' in dom and 'id="config"' in dom
    if kind != "missing":
        assert '<div class="config"><pre>model:' in dom and "max_length:" in dom
    if kind == "warnings":
        assert "kl_drift" in dom and 'class="marker"' in dom


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_screenshot(chromium, tmp_path):
    run_dir = write_run(
        tmp_path / "run", with_diagnoses(drifting_records()), config=demo_config(), summary=default_summary()
    )
    page = build_report(run_dir)
    shot = tmp_path / "report.png"
    done = browse(
        chromium, page, tmp_path / "profile", "--hide-scrollbars", "--window-size=1280,4200", f"--screenshot={shot}"
    )
    assert console_messages(done.stderr) == []
    assert png_size(shot) == (1280, 4200)
    assert shot.stat().st_size > 100_000  # a blank page compresses to a few kB; charts and text do not
    keep = os.environ.get("DPOKIT_REPORT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report-warnings.png")


def test_close_y_ticks_get_labels_that_differ():
    """An entropy chart between 7.5912 and 7.5918 labelled every tick 7.59 (issue 15.18)."""
    chart = Chart("entropy", [Series("entropy", "policy", [(1, 7.5912), (2, 7.5918)], "#1f77b4")])
    labels = re.findall(r'text-anchor="end">([^<]+)<', line_chart(chart))
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
