"""GPU checks (marked `gpu`, skipped without CUDA; bench/gpu_check.sh runs them on one GPU).

- the fast paired step equals the plain one in bf16 for each attention backend the GPU has
  (sdpa; flex_attention under torch.compile; flash-attention varlen when flash_attn is installed);
- FSDP2 (`train.fsdp=true`, torch's fully_shard, one process under torchrun) and DeepSpeed ZeRO-3 (one
  process under accelerate launch): 5 steps with a checkpoint at step 3, then a resume from it, gives the
  weights of the uninterrupted run exactly (Accelerate's FSDP plugin is refused: training/fsdp.py fsdp_problem);
- QLoRA (4-bit NF4 base + LoRA adapters) trains 5 steps with a finite, falling loss.
Tolerances: bf16 keeps 8 mantissa bits (relative 2^-8 = 3.9e-3 per rounding); the two steps round
at different places (packed vs padded rows, chunked vs full LM head), so per-sequence log-prob
sums of ~20 tokens agree to a few 1e-2 nats and losses to ~1e-2.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = ROOT / "src" / "dpokit" / "configs" / "accelerate"


def _pairs_and_cfg(run_dir: Path, **overrides) -> dict:
    """A 5-step bf16 run on one shared data file beside run_dir (resume checks the data is the same)."""
    data = run_dir.parent / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(40, seed=0))
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir()), "dtype": "bfloat16"},
        "data": {"path": str(data), "max_length": 48, "max_prompt_length": 16},
        "loss": {"beta": 0.1},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 4, "max_steps": 5, "logging_steps": 1, "progress_bar": False, "save_steps": 3},
        "speed": {"ref_cache": False},
        "out_dir": str(run_dir),
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    return cfg


BACKENDS = ["sdpa", "flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("attention", BACKENDS)
def test_fast_step_equals_plain_step_in_bf16(attention):
    from dpokit.config import load_config
    from dpokit.data.tokenization import TokenizedPair
    from dpokit.models import load_policy
    from dpokit.reference import make_reference
    from dpokit.steps.base import StepContext
    from dpokit.steps import FastPairedStep, PairedStep

    cfg = load_config(
        None,
        {
            "model.name_or_path": str(tiny_model_dir()),
            "model.dtype": "bfloat16",
            "model.attn_implementation": attention,
            "train.gradient_checkpointing": False,
        },
    )
    policy = load_policy(cfg).cuda()
    reference = make_reference(policy, cfg, True)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 40, (n,), generator=g).tolist()  # noqa: E731
    pairs = [
        TokenizedPair(ids(p), ids(c), ids(r), f"row {i}")
        for i, (p, c, r) in enumerate([(6, 5, 7), (4, 8, 3), (9, 4, 4)])
    ]
    results = []
    for step in (PairedStep(), FastPairedStep(cfg.speed, attention)):
        batch = {k: v.cuda() for k, v in step.collate(pairs, 0).items()}
        out, metrics = step.forward(policy, reference, batch, StepContext(cfg))
        results.append((out.losses.float(), metrics["logps/chosen"].float()))
    (plain_loss, plain_logps), (fast_loss, fast_logps) = results
    torch.testing.assert_close(fast_loss, plain_loss, rtol=0, atol=2e-2)
    torch.testing.assert_close(fast_logps, plain_logps, rtol=2e-2, atol=5e-2)


def _launch(backend: str, cfg: dict, tmp_path: Path) -> None:
    """One process: torchrun for FSDP2 (train.fsdp=true), accelerate launch with the shipped config for DeepSpeed."""
    script = tmp_path / "run.py"
    script.write_text("import json, sys\nimport dpokit\ndpokit.train(json.loads(sys.argv[1]))\n")
    if backend == "fsdp2":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ACCELERATE_CONFIGS / f"{backend}.yaml"),
            "--num_processes",
            "1",
        ]
    subprocess.run([*command, str(script), json.dumps(cfg)], check=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed_zero3"])
def test_one_process_sharded_run_resumes_exactly(backend, tmp_path):
    if backend == "deepspeed_zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed on this machine")
    from safetensors.torch import load_file

    sharding = {"train.fsdp": True} if backend == "fsdp2" else {}
    whole = _pairs_and_cfg(tmp_path / "whole", **sharding)  # 5 steps, checkpoints at steps 3 and 5
    _launch(backend, whole, tmp_path)
    checkpoint = Path(whole["out_dir"]) / "checkpoints" / "checkpoint-3"
    if backend == "fsdp2":
        assert (checkpoint / "dcp").is_dir(), "checkpoint-3 has no dcp/ shards: train.fsdp did not shard"
    resumed = _pairs_and_cfg(tmp_path / "resumed", **sharding, **{"train.resume": str(checkpoint)})
    _launch(backend, resumed, tmp_path)  # steps 4 and 5 again, from the step-3 checkpoint
    a = load_file(str(Path(whole["out_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(Path(resumed["out_dir"]) / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_qlora_trains_five_steps(tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed on this machine")
    import dpokit

    cfg = _pairs_and_cfg(tmp_path / "run", **{"lora.enabled": True, "model.dtype": "bfloat16"})
    cfg["model"]["quantization"] = "nf4"
    result = dpokit.train(cfg)
    losses = [json.loads(line).get("loss") for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert losses and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
