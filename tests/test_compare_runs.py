"""The same-outputs gate (bench/compare_runs.py, issue 23): identical output folders pass, and a planted one-value
change in any kind of output fails it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parents[1] / "bench" / "compare_runs.py"
spec = importlib.util.spec_from_file_location("compare_runs", BENCH)
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _outputs(root: Path, wall: float = 12.5, when: str = "2026-12-05 21:14:07") -> Path:
    """A small output folder: what same_outputs.sh leaves, in miniature, with this run's times in it."""
    (root / "dpo_live" / "final").mkdir(parents=True)
    (root / "rc.txt").write_text("demo rc 0\ndpo_live rc 0\n")
    logged = f"[{when},{int(wall * 37) % 1000:03d}] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU."
    (root / "demo.out").write_text(
        f"[demo] ready in {wall}s\n{logged}\npositive share 45.9% -> 94.9%\n[demo] wall time {wall:.0f}s\n"
    )
    (root / "dpo_live" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 0.69 - s / 100, "train_runtime": wall}) + "\n" for s in (1, 2))
    )
    (root / "dpo_live" / "data_summary.json").write_text(
        json.dumps({"train": {"rows_read": 402, "skipped": {"empty": 1}}})
    )
    (root / "dpo_live" / "config.yaml").write_text(f"out_dir: {root}/dpo_live\nloss:\n  beta: 0.5\n")
    (root / "dpo_live" / ".dpokit-run.json").write_text(json.dumps({"format": 1, "created": when}))
    clock = f'<!--clock--><div class="tile">tokens/s {1000 / wall:.0f}</div><!--/clock-->'  # report/page.py marks these
    (root / "dpo_live" / "report.html").write_text(f"<p>written {when}</p><p>loss 0.68</p>{clock}")
    (root / "dpo_live" / "final" / "README.md").write_text(f"Trained with dpokit 0.9.0 on {when[:10]}.\nloss 0.68\n")
    save_file(
        {"w": torch.arange(64, dtype=torch.float32)},
        str(root / "dpo_live" / "final" / "model.safetensors"),
        metadata={"format": "pt", "step": "2"},
    )
    return root


def test_two_runs_of_the_same_code_pass_the_gate(tmp_path):
    a = _outputs(tmp_path / "a")
    b = _outputs(tmp_path / "b", wall=13.75, when="2026-12-06 09:01:02")  # other times, other folder
    assert compare_runs.compare(a, b) == []
    done = subprocess.run([sys.executable, str(BENCH), str(a), str(b)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


PLANTS = {
    "a metric": lambda r: (r / "dpo_live" / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 0.69 - s / 100 + (1e-7 if s == 2 else 0), "train_runtime": 12.5}) + "\n"
            for s in (1, 2)
        )
    ),
    "a nested count": lambda r: (r / "dpo_live" / "data_summary.json").write_text(
        json.dumps({"train": {"rows_read": 402, "skipped": {"empty": 2}}})
    ),
    "an added key": lambda r: (r / "dpo_live" / "data_summary.json").write_text(
        json.dumps({"train": {"rows_read": 402, "skipped": {"empty": 1}, "new": 0}})
    ),
    "a config value": lambda r: (r / "dpo_live" / "config.yaml").write_text(
        f"out_dir: {r}/dpo_live\nloss:\n  beta: 0.1\n"
    ),
    "an exit status": lambda r: (r / "rc.txt").write_text("demo rc 0\ndpo_live rc 1\n"),
    "the console": lambda r: (r / "demo.out").write_text((r / "demo.out").read_text().replace("94.9%", "95.0%")),
    "the report": lambda r: (r / "dpo_live" / "report.html").write_text(
        (r / "dpo_live" / "report.html").read_text().replace("0.68", "0.67")
    ),
    "one weight": lambda r: save_file(
        {"w": torch.arange(64, dtype=torch.float32) + (torch.arange(64) == 7)},
        str(r / "dpo_live" / "final" / "model.safetensors"),
        metadata={"format": "pt", "step": "2"},
    ),
    "weights' metadata": lambda r: save_file(
        {"w": torch.arange(64, dtype=torch.float32)},
        str(r / "dpo_live" / "final" / "model.safetensors"),
        metadata={"format": "pt", "step": "3"},
    ),
    "a file on one side only": lambda r: (r / "dpo_live" / "extra.txt").write_text("x"),
    "a removed file": lambda r: (r / "rc.txt").unlink(),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_planted_change_in_any_output_fails_the_gate(tmp_path, plant):
    a = _outputs(tmp_path / "a")
    b = _outputs(tmp_path / "b")
    PLANTS[plant](b)
    assert compare_runs.compare(a, b), plant
    done = subprocess.run([sys.executable, str(BENCH), str(a), str(b)], capture_output=True, text=True)
    assert done.returncode == 1 and "DIFFERS" in done.stdout


def test_a_missing_run_on_one_side_fails_the_gate(tmp_path):
    a = _outputs(tmp_path / "a")
    b = _outputs(tmp_path / "b")
    shutil.rmtree(b / "dpo_live")
    assert any("only in A" in line for line in compare_runs.compare(a, b))


def test_the_report_numbers_of_the_clock_and_the_cards_date_are_exempt_and_nothing_else(tmp_path):
    a = _outputs(tmp_path / "a", wall=12.5, when="2026-12-05 23:59:58")
    b = _outputs(tmp_path / "b", wall=13.9, when="2026-12-06 00:00:03")  # tokens/s and the day differ
    assert compare_runs.compare(a, b) == []
    report = b / "dpo_live" / "report.html"
    report.write_text(report.read_text().replace("loss 0.68", "loss 0.67"))  # outside the marked part
    assert len(compare_runs.compare(a, b)) == 1
