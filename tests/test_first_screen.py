"""A clean first screen (issue 20.5): a command prints its own output and nothing from a library before it.

bitsandbytes 0.50 looks for a hub kernel when it is imported on a CPU with AVX-512 bf16 and logs
"Failed to load CPU gemm_4bit_forward from kernels-community ... Set trust_remote_code=True" when it
cannot. peft imports bitsandbytes whenever it is installed, and transformers' schedulers import peft,
so every command printed it. dpokit now imports them only for LoRA, QLoRA and 8-bit AdamW.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpokit.config import load_config
from dpokit.training.optim import make_schedule

DPOKIT = Path(sys.executable).with_name("dpokit")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["config"], ["train", "--help"]])
def test_commands_print_nothing_on_stderr(args):
    done = subprocess.run([str(DPOKIT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout
    assert done.stderr == ""


def test_what_the_demo_imports_and_runs_before_training_brings_in_neither_peft_nor_bitsandbytes():
    """The demo's modules, its model loading (a tiny model) and its schedule: no peft, no bitsandbytes, nothing on stderr."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import dpokit.cli, dpokit.online.demo, dpokit.training.loop\n"
        "from dpokit.config import load_config\n"
        "from dpokit.models import load_policy\n"
        "from dpokit.training.optim import make_optimizer, make_schedule\n"
        "from tiny_assets import tiny_model_dir\n"
        "cfg = load_config(None, {'model.name_or_path': str(tiny_model_dir()), 'optim.scheduler': 'cosine'})\n"
        "policy = load_policy(cfg)\n"
        "make_schedule(cfg, make_optimizer(cfg, policy), 10)\n"
        "print(sorted(name for name in ('peft', 'bitsandbytes', 'transformers.trainer_utils') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "kernels-community" not in done.stderr and "trust_remote_code" not in done.stderr


@pytest.mark.parametrize(
    "scheduler, warmup", [("linear", 3), ("cosine", 3), ("constant", 3), ("linear", 0), ("cosine", 0)]
)
def test_the_schedules_give_transformers_learning_rates(scheduler, warmup):
    """make_schedule's LambdaLR (no transformers import) equals get_scheduler's, step by step, past the end too."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(scheduler, scheduler)
    cfg = load_config(None, {"optim.scheduler": scheduler, "optim.warmup_steps": warmup, "optim.lr": 0.1})

    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = make(optimizer)
        out = []
        for _ in range(12):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    ours = lrs(lambda opt: make_schedule(cfg, opt, 10))
    theirs = lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=10))
    assert ours == theirs
    assert math.isclose(max(ours), 0.1)


def test_schedule_state_round_trips_for_resume():
    cfg = load_config(None, {"optim.scheduler": "cosine", "optim.warmup_steps": 2})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = make_schedule(cfg, optimizer, 10)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    again = make_schedule(cfg, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 10)
    again.load_state_dict(schedule.state_dict())
    assert again.get_last_lr() == schedule.get_last_lr() and again.last_epoch == 4


# --- pillow: data.vision reads images with it ------------------------------------------------------


def test_pillow_is_declared_for_vision_and_for_the_tests():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.lower().startswith("pillow") for req in extras["vision"])
    assert any(req.lower().startswith("pillow") for req in extras["test"])  # not only through tensorboard


def test_vision_rows_without_pillow_say_so_in_one_line_naming_the_install(tmp_path, monkeypatch):
    from dpokit.data.vision import load_vision_preferences
    from vision_assets import colour_rows, write_images, write_rows

    write_images(tmp_path)
    path = write_rows(tmp_path / "rows.jsonl", colour_rows(2))
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if pillow were not installed
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ValueError) as error:
        load_vision_preferences(str(path))
    assert "pip install 'dpokit[vision]'" in str(error.value) and "\n" not in str(error.value)


def test_the_readme_and_ci_install_with_the_constraints_that_pin_what_ci_saw():
    """A fresh install resolves the versions CI ran (bitsandbytes 0.50.2's CPU repack broke a test that 0.49 passed)."""
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"  # no local tag (+cpu): pip picks the build for the machine
    for name in ("bitsandbytes", "trl", "pillow", "transformers", "peft", "accelerate", "tensorboard", "pytest"):
        assert name in pins, name
    assert "dpokit" not in pins
    command = 'pip install torch==2.13.0 -e ".[test]" -c constraints.txt'
    assert command in (ROOT / "README.md").read_text() and command in (ROOT / ".ci" / "run").read_text()
