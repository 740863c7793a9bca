"""DeepSpeed ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo): two processes train exactly like one process with the same global batch.

`accelerate launch` with the shipped src/dpokit/configs/accelerate/deepspeed_zero3.yaml (2 processes, fp32:
dpokit passes train.mixed_precision=no to the Accelerator) runs `dpokit.train` for 4 DPO steps of the tiny model.
Full fine-tuning with a live, ZeRO-3-partitioned reference crashes in step 3, after checkpoint-2 (written by
Accelerate's `save_state`: one ZeRO shard file per process), and the relaunch resumes from it; LoRA runs through.
Loss curve, metrics and final weights equal one process with batch 8 to 1e-5, as under DDP (test_distributed.py).

What dpokit itself does for this (nothing here stands in for it): Accelerator(cpu=False) over gloo when DeepSpeed
runs without CUDA, train_micro_batch_size_per_gpu = train.batch_size for the config's "auto"
(training/setup.accelerator_for), the policy loaded whole (reference.loaded_whole), no empty optimizer group
(training/optim.make_optimizer). The launched script adds only the crash, and skips DeepSpeed's JIT build of its
shared-memory op (g++ and ninja, 1-2 min on a cold cache), which only tensor-parallel inference uses: nothing is
compiled, which the tests check (TORCH_EXTENSIONS_DIR points into tmp_path).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
from dpokit.config import load_config
from dpokit.models import load_policy
from dpokit.training.checkpoint import list_checkpoints
from dpokit.training.metrics import read_metrics
from dpokit.training.optim import make_optimizer
from tiny_assets import free_port, synthetic_pairs, tiny_model_dir, write_jsonl

# A test extra (pyproject.toml); not imported here, only the launched processes use it.
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed: pip install -e '.[test]' -c constraints.txt",
)
TESTS = Path(__file__).resolve().parent
ACCELERATE_CONFIG = TESTS.parent / "src" / "dpokit" / "configs" / "accelerate" / "deepspeed_zero3.yaml"
STEPS = 4
_LAUNCHED = """
import json, sys
import deepspeed.ops

# DeepSpeed's CPU backend JIT-compiles a shared-memory op (deepspeed_shm_comm: g++ and ninja, 1-2 min on a cold cache)
# in every init_distributed; only inference_all_reduce (tensor-parallel inference) uses it, never ZeRO-3 training.
# No setting skips it, so the op is marked incompatible, as DeepSpeed does on platforms without it: plain gloo.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

import dpokit
import dpokit.training.loop as loop

crash_at = int(sys.argv[2])
if crash_at:
    original, calls = loop.accumulate_gradients, []
    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)
    loop.accumulate_gradients = crashing
dpokit.train(json.loads(sys.argv[1]))
"""


def _config(tmp_path: Path, name: str, batch_size: int, lora: bool = False) -> dict:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(33, seed=1))
    return {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "loss": {"beta": 0.5},
        "optim": {
            "lr": 3e-3,
            "scheduler": "linear",
            "warmup_steps": 1,
            "max_grad_norm": 1.0,
        },  # = the config's gradient_clipping
        "speed": {"ref_cache": False},  # full fine-tuning: a live reference, its own ZeRO-3 inference engine
        "lora": {"enabled": lora, "r": 4, "dropout": 0.0},  # no dropout: 2 processes draw other masks than 1
        "train": {
            "batch_size": batch_size,
            "max_steps": STEPS,
            "logging_steps": 1,
            "save_steps": 2,
            "progress_bar": False,
        },
        "out_dir": str(tmp_path / name),
    }


def _assert_same_run(two: Path, one: Path, weights: str = "model.safetensors", tol: float = 1e-5) -> None:
    """The same steps, metrics and final weights (to tol: float summation order), as test_distributed checks for DDP."""
    curves = [[r for r in read_metrics(Path(d) / "metrics.jsonl") if "loss" in r] for d in (two, one)]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*curves):
        for key in (
            "loss",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "grad_norm",
            "learning_rate",
            "epoch",
        ):
            assert a[key] == pytest.approx(b[key], abs=tol), (a["step"], key)
    w2, w1 = (load_file(str(Path(d) / "final" / weights)) for d in (two, one))
    assert w2.keys() == w1.keys() and w1
    for name in w1:
        assert torch.allclose(w2[name], w1[name], atol=tol, rtol=0), name


def _assert_zero3_shards(checkpoint: Path) -> None:
    """ZeRO-3 ran (not a silent DDP fallback): each process wrote its own partition of the weights and AdamW state."""
    shards = checkpoint / "accelerate" / "pytorch_model"
    assert sorted(p.name for p in shards.iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")
    ]


def _launch(tmp_path: Path, cfg: dict, crash_at: int = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "zero3_run.py"
    script.write_text(_LAUNCHED)
    port = free_port()
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        port,
        str(script),
        json.dumps(cfg),
        str(crash_at),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert not (tmp_path / "torch_extensions").exists(), "a DeepSpeed op was JIT-compiled"
    return done


@needs_deepspeed
@pytest.mark.slow
def test_zero3_two_processes_checkpoint_resume_and_match_one_process_with_the_same_global_batch(tmp_path):
    one = dpokit.train(_config(tmp_path, "one", batch_size=8)).run_dir
    cfg = _config(tmp_path, "two", batch_size=4)
    crashed = _launch(tmp_path, cfg, crash_at=3)  # both processes die in step 3, after checkpoint-2
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["checkpoint-2"]
    _assert_zero3_shards(tmp_path / "two" / "checkpoints" / "checkpoint-2")
    resumed = _launch(tmp_path, cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert "FSDP/DeepSpeed: speed.chunked_logps is off" in resumed.stdout
    _assert_same_run(tmp_path / "two", one)


@needs_deepspeed
@pytest.mark.slow
def test_zero3_lora_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one = dpokit.train(_config(tmp_path, "one", batch_size=8, lora=True)).run_dir
    done = _launch(tmp_path, _config(tmp_path, "two", batch_size=4, lora=True))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_zero3_shards(tmp_path / "two" / "checkpoints" / "checkpoint-4")
    _assert_same_run(tmp_path / "two", one, weights="adapter_model.safetensors")


def test_lora_optimizer_has_no_empty_parameter_group(tmp_path):
    """LoRA trains no bias or norm: ZeRO-3 would drop the empty no-decay group and the schedule would step one group too many."""
    cfg = load_config(_config(tmp_path, "unused", batch_size=4, lora=True))
    policy = load_policy(cfg)
    optimizer = make_optimizer(cfg, policy)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.optim.weight_decay]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in policy.parameters() if p.requires_grad
    }
