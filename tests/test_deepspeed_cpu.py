"""DeepSpeed ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo): two processes train exactly like one process with the same global batch.

`accelerate launch` with the shipped src/dpokit/configs/accelerate/deepspeed_zero3.yaml (2 processes, fp32:
dpokit passes train.mixed_precision=no to the Accelerator) runs 4 DPO steps of the tiny model with a live,
ZeRO-3-partitioned reference; the run crashes in step 3, after checkpoint-2 (written by Accelerate's
`save_state`: one ZeRO shard file per process), and the relaunch resumes from it. Loss curve, metrics and
final weights equal one process with batch 8 to 1e-5, as under DDP (test_distributed.py).

Skipped where deepspeed is not installed (it is not a test extra). Nothing is compiled: the launched processes
skip DeepSpeed's JIT build of its shared-memory op (deepspeed_shm_comm: g++ and ninja, 1-2 min on a cold
cache), which only tensor-parallel inference uses; TORCH_EXTENSIONS_DIR points into tmp_path.

_SHIM stands for three changes dpokit's source needs for DeepSpeed (docs/deepspeed_cpu_findings.md); each is
a no-op once the source has it, and the shim can then go:
  1. Accelerator(cpu=False) with the gloo backend when there is no CUDA: with cpu=True Accelerate ignores its
     DeepSpeed plugin and silently runs DDP (CPU only);
  2. an integer train_micro_batch_size_per_gpu (= train.batch_size): dpokit's prepare() gets no dataloader,
     so Accelerate cannot fill the config's "auto" and raises ValueError (any device);
  3. the policy loaded whole: Accelerate's ZeRO-3 plugin registers its config with transformers whatever
     zero3_init_flag says, so from_pretrained partitions the weights and the reference's deep copy has empty
     tensors (AssertionError in the first reference forward, any device).
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

if importlib.util.find_spec("deepspeed") is None:  # not imported here: only the launched processes use it
    pytest.skip("deepspeed is not installed (pip install deepspeed; it is not a test extra): the ZeRO-3 CPU test needs it",
                allow_module_level=True)

import dpokit  # noqa: E402
from dpokit.training.checkpoint import list_checkpoints  # noqa: E402
from dpokit.training.metrics import read_metrics  # noqa: E402
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl  # noqa: E402

TESTS = Path(__file__).resolve().parent
ACCELERATE_CONFIG = TESTS.parent / "src" / "dpokit" / "configs" / "accelerate" / "deepspeed_zero3.yaml"
STEPS = 4
_SHIM = """
import importlib, json, sys
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
import dpokit.training.loop as loop
ds_comm = importlib.import_module("deepspeed.comm.torch")  # not `import ... as`: deepspeed.comm.torch is also torch itself

# DeepSpeed's CPU backend JIT-compiles a shared-memory op (g++, 1-2 min cold) used only by inference_all_reduce
# (tensor-parallel inference), never by ZeRO-3 training: without it every collective is plain gloo.
ds_comm.build_shm_op = lambda: None

def accelerator_for(cfg, **kwargs):
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]  # 1.
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=False, step_scheduler_with_optimizer=False,
                      kwargs_handlers=handlers, **kwargs)
    plugin = acc.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):  # 2.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    return acc

original_load_policy = loop.load_policy

def load_policy(cfg):  # 3.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    plugin = AcceleratorState().deepspeed_plugin
    if plugin is None or plugin.zero3_init_flag:
        return original_load_policy(cfg)
    unset_hf_deepspeed_config()
    try:
        return original_load_policy(cfg)
    finally:
        plugin.set_deepspeed_weakref()

loop.accelerator_for, loop.load_policy = accelerator_for, load_policy

crash_at = int(sys.argv[2])
if crash_at:
    original, calls = loop.accumulate_gradients, []
    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)
    loop.accumulate_gradients = crashing
import dpokit
dpokit.train(json.loads(sys.argv[1]))
"""


def _config(tmp_path: Path, name: str, batch_size: int) -> dict:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(33, seed=1))
    return {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "loss": {"beta": 0.5},
        "optim": {"lr": 3e-3, "scheduler": "linear", "warmup_steps": 1, "max_grad_norm": 1.0},  # = the config's gradient_clipping
        "speed": {"ref_cache": False},  # a live reference: its own ZeRO-3 inference engine
        "train": {"batch_size": batch_size, "max_steps": STEPS, "logging_steps": 1, "save_steps": 2, "progress_bar": False},
        "out_dir": str(tmp_path / name),
    }


def _assert_same_run(two: Path, one: Path, tol: float = 1e-5) -> None:
    """The same steps, metrics and final weights (to tol: float summation order), as test_distributed checks for DDP."""
    curves = [[r for r in read_metrics(Path(d) / "metrics.jsonl") if "loss" in r] for d in (two, one)]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*curves):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm", "learning_rate", "epoch"):
            assert a[key] == pytest.approx(b[key], abs=tol), (a["step"], key)
    w2, w1 = (load_file(str(Path(d) / "final" / "model.safetensors")) for d in (two, one))
    assert w2.keys() == w1.keys()
    for name in w1:
        assert torch.allclose(w2[name], w1[name], atol=tol, rtol=0), name


def _launch(tmp_path: Path, cfg: dict, crash_at: int = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "zero3_run.py"
    script.write_text(_SHIM)
    port = str(29500 + (os.getpid() + 500) % 1000)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
               "--num_processes", "2", "--main_process_port", port, str(script), json.dumps(cfg), str(crash_at)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_zero3_two_processes_checkpoint_resume_and_match_one_process_with_the_same_global_batch(tmp_path):
    one = dpokit.train(_config(tmp_path, "one", batch_size=8)).run_dir
    cfg = _config(tmp_path, "two", batch_size=4)
    crashed = _launch(tmp_path, cfg, crash_at=3)  # both processes die in step 3, after checkpoint-2
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "two")] == ["checkpoint-2"]
    shards = tmp_path / "two" / "checkpoints" / "checkpoint-2" / "accelerate" / "pytorch_model"
    # ZeRO-3 ran (not a silent DDP fallback): each process wrote its own partition of the weights and AdamW state
    assert sorted(p.name for p in shards.iterdir()) == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1)
                                                        for kind in ("model", "optim")]
    resumed = _launch(tmp_path, cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert "FSDP/DeepSpeed: speed.chunked_logps is off" in resumed.stdout
    _assert_same_run(tmp_path / "two", one)
