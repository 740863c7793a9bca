"""dpokit vs TRL 1.16's DPOTrainer, side by side, each run in its own process.

    python bench/dpo_vs_trl.py                       # workloads a, b, c on CPU, fp32; prints the table
    python bench/dpo_vs_trl.py --workloads b --steps 4 --write-docs   # and writes it into docs/benchmarks.md
    python bench/dpo_vs_trl.py --gpu --workloads g   # the GPU variant: bf16, ~0.5B-parameter Llama (needs CUDA)

Both sides train the same randomly initialised Llama-architecture model (built from a
config, saved once as a HF folder), on the same text pairs (a word-level tokenizer, so a
word is a token and lengths are exact), in dataset order, same batch size, precision,
loss (sigmoid DPO, beta 0.1), AdamW, constant learning rate, gradient clipping at 1.0.

Workloads (CPU: hidden 256, 4 layers, 4 heads, intermediate 704, fp32; batch 8 pairs):
  a  short uniform pairs: prompt 64, chosen 64, rejected 64 words; 8k vocabulary
  b  realistic: prompt 50-600, completions 20-400 words (uniform); 8k vocabulary
  c  b's lengths with a 32k-token vocabulary
  g  (GPU) b's lengths, 32k vocabulary, ~0.47B parameters (hidden 1024, 24 layers, 16 heads, intermediate 4096), bf16
Real shapes (random weights, the released model's architecture and full vocabulary; bench/workloads.py;
prompts 64-256, completions 32-192, batch 4 pairs; fp32 on CPU, bf16 autocast with --gpu):
  q05  Qwen2.5-0.5B shape (494M parameters, vocabulary 151,936, tied)
  l1b  Llama-3.2-1B shape (1.24B parameters, vocabulary 128,256, tied, llama3 rope); ~22-27 GiB in fp32 on CPU
    python bench/dpo_vs_trl.py --workloads q05 --layers 2 --steps 1 --warmup 1 --variants trl,precompute,dpokit  # quick check
    python bench/dpo_vs_trl.py --workloads q05 --steps 1 --warmup 1 --variants trl,precompute,dpokit            # ~30 min on 2 cores
    python bench/dpo_vs_trl.py --gpu --workloads l1b
--layers N overrides the depth. Both sides use their default AdamW: torch's fused kernel (TRL through HF Trainer's
adamw_torch_fused, dpokit's optim.fused).
Each child prints a memory trace: RSS at the end of each phase and the highest RSS inside it (bench/memtrace.py).

Runs per workload (`--variants`):
  trl           TRL's DPOTrainer with its defaults (gradient checkpointing on), fp32
  trl-nogc      the same without gradient checkpointing
  dpokit        dpokit's defaults: packing, prefix sharing, chunked LM head, gradient checkpointing
                (on by default, like TRL), reference log-probs from the cache, which `precompute`
                (its own process, like `dpokit precompute`) builds first and is reported on its own row
  dpokit-nogc   the same with train.gradient_checkpointing=false
  dpokit-live   no reference cache (speed.ref_cache=false): a live reference model in memory and its
                forward every step
  dpokit-plain  every speed option off (the padded [chosen; rejected] batch, full logits)

Reported per run: pairs/s and tokens/s after `--warmup` steps (tokens = prompt + chosen +
rejected words of the pairs, so both sides count the same work), peak RSS of the process
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the whole process from start: imports,
weights, optimizer, activations), step-1 and step-2 loss, and the fraction of this machine's
matmul peak reached: model FLOPs of the DPO step / step time / `torch.matmul` FLOP/s measured
in the same process. Model FLOPs per step, the same numerator for every run: for each of the
2B sequences prompt+completion of length T (no padding), forward = 2 * N_layers_params * T
+ 2 * hidden * vocab * T (LM head at every position) + 2 * n_layers * hidden * T^2 (causal
attention); policy forward+backward = 3 x forward; reference forward = 1 x forward. A run
that skips work (cached reference, shared prompt, LM head on completion tokens only) is
credited with the work it made unnecessary, which is what "fraction of peak" should show.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from memtrace import MemTrace, format_floor, format_trace  # noqa: E402 (bench/ is sys.path[0])
from workloads import WORKLOADS, model_config  # noqa: E402

VARIANTS = ["trl", "trl-nogc", "precompute", "dpokit", "dpokit-nogc", "dpokit-live"]
BETA, LR = 0.1, 1e-4


# --------------------------------------------------------------------------- assets


def build_assets(name: str, cache: Path, n_pairs: int, seed: int = 0, layers: int | None = None) -> tuple[Path, Path]:
    """A saved model + tokenizer folder and a jsonl of text pairs for a workload (built once).

    The word-level tokenizer has exactly the workload's vocabulary (ids 0 .. vocab-1 all exist), so the
    embedding and LM head are the real size; `layers` overrides the depth (a quick reduced run).
    """
    w = WORKLOADS[name]
    folder = cache / (f"{name}-{n_pairs}" + (f"-L{layers}" if layers is not None else ""))
    model_dir, data = folder / "model", folder / "pairs.jsonl"
    if (model_dir / "config.json").exists() and data.exists():
        return model_dir, data
    import torch
    from transformers import AutoModelForCausalLM

    from dpokit.tiny import build_tokenizer, save_tiny

    words = [f"t{i}" for i in range(w["vocab"] - 5)]  # + 5 special tokens = the vocabulary size
    tokenizer = build_tokenizer([" ".join(words)], kind="word", vocab_size=w["vocab"])
    config = model_config(name, tokenizer, layers)
    torch.manual_seed(seed)
    save_tiny(AutoModelForCausalLM.from_config(config), tokenizer, model_dir)
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    rows = []
    for _ in range(n_pairs):
        p = rng.randint(*w["prompt"])
        # EOS is appended by both trainers: completion tokens = words + 1
        rows.append(
            {
                "prompt": text(p),
                "chosen": " " + text(rng.randint(*w["completion"]) - 1),
                "rejected": " " + text(rng.randint(*w["completion"]) - 1),
            }
        )
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


# --------------------------------------------------------------------------- measurements


def matmul_peak(device: str, dtype_name: str) -> float:
    """FLOP/s of a large square torch.matmul in this process (the machine's practical matmul peak)."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n**3 / best


def model_flops(pairs, config) -> float:
    """Model FLOPs of one DPO step (policy fwd+bwd, reference fwd) over `pairs` (see the module docstring)."""
    h, layers, v, inter = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer_params = h * h * 2 + h * kv * 2 + 3 * h * inter
    total = 0.0
    for prompt, chosen, rejected in pairs:
        for t in (prompt + chosen, prompt + rejected):
            fwd = 2 * layers * layer_params * t + 2 * h * v * t + 2 * layers * h * t * t
            total += 4 * fwd  # 3 x (policy fwd + bwd) + 1 x reference fwd
    return total


def executed_flops(pairs, config, shared: bool, reference: bool, head_everywhere: bool) -> float:
    """FLOPs a run actually performs for one step (fwd+bwd = 3 x fwd; recomputation not counted, as in MFU).

    shared=False: the padded batch, 2B rows as long as the longest prompt + completion; shared=True: each
    pair once as [prompt, chosen, rejected], no padding, attention per unit. head_everywhere: the LM head at
    every position (TRL on CPU, the plain path) rather than at completion tokens only.
    """
    h, layers, v, inter = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer_params = h * h * 2 + h * kv * 2 + 3 * h * inter
    if shared:
        tokens = sum(p + c + r for p, c, r in pairs)
        keys = sum((p + c) ** 2 / 2 + r * p + r * r / 2 for p, c, r in pairs)
        head = tokens if head_everywhere else sum(c + r for _, c, r in pairs)
    else:
        width = max(p + max(c, r) for p, c, r in pairs)
        tokens = 2 * len(pairs) * width
        keys = 2 * len(pairs) * width * width / 2
        head = tokens if head_everywhere else sum(c + r for _, c, r in pairs)
    fwd = 2 * layers * layer_params * tokens + 2 * h * v * head + 4 * layers * h * keys
    return (3 + (1 if reference else 0)) * fwd


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _report(result: dict) -> None:
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _summarise(
    times: list[float],
    losses: list[float],
    lengths: list[tuple],
    warmup: int,
    batch: int,
    flops_per_step: list[float],
    peak: float,
    executed_per_step: list[float],
    cpu_times: list[float],
) -> dict:
    """cpu_times: the process's CPU seconds per step (all threads, time.process_time), which other jobs on the machine do not inflate as they do wall time."""
    measured = times[warmup:]
    elapsed = sum(measured)
    steps = len(measured)
    tokens = sum(p + c + r for p, c, r in lengths[warmup * batch : (warmup + steps) * batch])
    return {
        "pairs_per_s": steps * batch / elapsed,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / steps,
        "cpu_step_s": sum(cpu_times[warmup:]) / steps,
        "loss_step1": losses[0],
        "loss_step2": losses[1] if len(losses) > 1 else None,
        "flops_per_s": sum(flops_per_step[warmup:]) / elapsed,
        "executed_flops_per_s": sum(executed_per_step[warmup : warmup + steps]) / elapsed,
        "matmul_peak": peak,
        "peak_rss_mib": peak_rss_mib(),
    }


# --------------------------------------------------------------------------- children


def plain_tokenizer_loading() -> None:
    """Load the bench's word-level tokenizer as the plain fast tokenizer it is, on both sides.

    transformers 5's AutoTokenizer rebuilds the tokenizer of a `qwen2` model folder as Qwen2Tokenizer
    (byte-level BPE from the vocabulary), which tokenises every `t123` word to nothing; a real Qwen
    checkpoint ships a tokenizer of that class, the bench's synthetic vocabulary is not one.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    AutoTokenizer.from_pretrained = staticmethod(lambda *a, **kw: PreTrainedTokenizerFast.from_pretrained(*a, **kw))


def child_trl(args) -> None:
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()
    trace = MemTrace()
    trace.mark("imports")
    device = "cuda" if args.gpu else "cpu"
    peak = matmul_peak(device, "bfloat16" if args.gpu else "float32")
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    total = args.warmup + args.steps
    rows = rows[: total * args.batch_size]
    times, last, cpu_times, last_cpu = [], [None], [], [None]

    step = [0]

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            trace.mark("train begin (optimizer built, state lazy)")

        def on_step_begin(self, a, state, control, **kw):
            step[0] += 1
            if last[0] is None:
                last[0], last_cpu[0] = time.perf_counter(), time.process_time()

        def on_pre_optimizer_step(self, a, state, control, **kw):
            trace.mark(f"step {step[0]}: backward + clip")

        def on_optimizer_step(self, a, state, control, **kw):
            trace.mark(f"step {step[0]}: AdamW step")

        def on_step_end(self, a, state, control, **kw):
            trace.mark(f"step {step[0]}: zero_grad, logging")
            if args.gpu:
                torch.cuda.synchronize()
            now, now_cpu = time.perf_counter(), time.process_time()
            times.append(now - last[0])
            cpu_times.append(now_cpu - last_cpu[0])
            last[0], last_cpu[0] = now, now_cpu

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        report_to=[],
        use_cpu=not args.gpu,
        seed=42,
        save_strategy="no",
        disable_tqdm=True,
        bf16=args.gpu,
        fp16=False,
        gradient_checkpointing=args.variant == "trl",
        max_length=None,
        per_device_train_batch_size=args.batch_size,
        max_steps=total,
        logging_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer = DPOTrainer(
        model=args.model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trace.mark("policy + reference loaded, data tokenised")
    trace.wrap_backward(trainer.accelerator, step)
    lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset]
    assert min(p for p, _, _ in lengths) > 8, "the tokenizer dropped the words: check plain_tokenizer_loading"
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    cfg = trainer.model.config
    batches = [lengths[i * args.batch_size : (i + 1) * args.batch_size] for i in range(total)]
    flops = [model_flops(b, cfg) for b in batches]
    executed = [executed_flops(b, cfg, shared=False, reference=True, head_everywhere=True) for b in batches]
    _report(
        {
            **_summarise(times, losses, lengths, args.warmup, args.batch_size, flops, peak, executed, cpu_times),
            "memtrace": trace.rows,
        }
    )


def _dpokit_config(args, gc: bool, speed: dict):
    from dpokit.config import load_config

    raw = {
        "model": {"name_or_path": args.model, "dtype": "float32"},
        "data": {"path": args.data, "max_length": 1024, "max_prompt_length": 640},
        "loss": {"type": "sigmoid", "beta": BETA},
        "optim": {"lr": LR, "scheduler": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0},
        "train": {
            "batch_size": args.batch_size,
            "gradient_checkpointing": gc,
            "progress_bar": False,
            "mixed_precision": "bf16" if args.gpu else "no",
            "max_steps": args.warmup + args.steps,
        },
        "out_dir": tempfile.mkdtemp(prefix="dpokit-bench-"),
    }
    cfg = load_config({**raw, "speed": speed})
    return cfg


def _speed_for(variant: str) -> dict:
    if variant == "dpokit-live":
        return {"ref_cache": False}
    if variant == "dpokit-plain":
        return {"packing": False, "prefix_sharing": False, "chunked_logps": False, "ref_cache": False}
    return {}


def child_precompute(args) -> None:
    from dpokit.models import load_tokenizer
    from dpokit.ref_cache.build import ensure_reference_cache
    from dpokit.steps import step_for

    cfg = _dpokit_config(args, gc=False, speed={})
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    data = step_for(cfg).prepare(cfg, tokenizer)
    n = (args.warmup + args.steps) * args.batch_size
    data.train = data.train[:n]
    cache, _ = ensure_reference_cache(cfg, tokenizer, data)
    elapsed = time.perf_counter() - started
    _report({"pairs_per_s": n / elapsed, "seconds": elapsed, "built": cache.built, "peak_rss_mib": peak_rss_mib()})


def child_dpokit(args) -> None:
    """dpokit's training step as `dpokit train` sets it up (steps.step_for, training.setup.fit_speed and reference_for), timed step by step."""
    import contextlib
    import io

    import torch
    from accelerate import Accelerator

    import dpokit.training.loop as trainer  # the modules a training run imports
    from dpokit.steps import StepContext, step_for
    from dpokit.training.step_runner import StepJob
    from dpokit.training.setup import fit_speed, reference_for
    from dpokit.losses import needs_reference
    from dpokit.training.metrics import MetricSums
    from dpokit.models import load_policy, load_tokenizer
    from dpokit.training.optim import make_optimizer

    trace = MemTrace()
    trace.mark("imports")
    device = "cuda" if args.gpu else "cpu"
    peak = matmul_peak(device, "bfloat16" if args.gpu else "float32")
    cfg = _dpokit_config(args, gc=args.variant != "dpokit-nogc", speed=_speed_for(args.variant))
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not args.gpu)
    tokenizer = load_tokenizer(cfg)
    task = step_for(cfg)
    data = task.prepare(cfg, tokenizer)
    total = args.warmup + args.steps
    data.train = data.train[: total * args.batch_size]
    data.eval = []
    policy = load_policy(cfg)
    trace.mark("policy loaded, data tokenised")
    with_reference = needs_reference(cfg.loss)
    cfg, task, _ = fit_speed(cfg, task, policy, sharded=False)
    speed = cfg.speed
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        policy, reference, data = reference_for(cfg, task, policy, tokenizer, data, accelerator, with_reference)
    assert "computed" not in said.getvalue(), "run the precompute variant first"
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, policy)  # as `dpokit train` builds it: AdamW, fused (optim.fused)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    trace.mark("reference (cache or model) ready, optimizer built (state lazy)")
    current = [0]
    trace.wrap_backward(accelerator, current)
    pairs = data.train
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    assert min(p for p, _, _ in lengths) > 8, "the tokenizer dropped the words: check plain_tokenizer_loading"
    times, losses, cpu_times = [], [], []
    last, last_cpu = time.perf_counter(), time.process_time()
    for step in range(total):
        current[0] = step + 1
        batch_pairs = pairs[step * args.batch_size : (step + 1) * args.batch_size]
        micro = [task.collate(batch_pairs, tokenizer.pad_token_id)]
        sums = MetricSums()
        trainer.accumulate_gradients(
            StepJob(policy, reference, task, StepContext(cfg, with_reference, group=accelerator)), micro, sums
        )
        accelerator.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
        trace.mark(f"step {step + 1}: backward + clip")
        optimizer.step()
        trace.mark(f"step {step + 1}: AdamW step")
        optimizer.zero_grad(set_to_none=True)
        trace.mark(f"step {step + 1}: zero_grad, metrics")
        losses.append(sums.reduce()["loss"])
        if args.gpu:
            torch.cuda.synchronize()
        now, now_cpu = time.perf_counter(), time.process_time()
        times.append(now - last)
        cpu_times.append(now_cpu - last_cpu)
        last, last_cpu = now, now_cpu
    config = accelerator.unwrap_model(policy).config
    batches = [lengths[i * args.batch_size : (i + 1) * args.batch_size] for i in range(total)]
    flops = [model_flops(b, config) for b in batches]
    executed = [
        executed_flops(
            b,
            config,
            shared=speed.prefix_sharing,
            reference=reference is not None or not speed.ref_cache,
            head_everywhere=not speed.any_fast_path,
        )
        for b in batches
    ]
    _report(
        {
            **_summarise(times, losses, lengths, args.warmup, args.batch_size, flops, peak, executed, cpu_times),
            "memtrace": trace.rows,
        }
    )


# --------------------------------------------------------------------------- orchestration


def run_child(variant: str, workload: str, model: Path, data: Path, args, env: dict, batch: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(batch),
    ] + (["--gpu"] if args.gpu else [])
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{variant} on workload {workload} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("BENCH_RESULT ") :])
    result.update(variant=variant, workload=workload, wall_s=time.time() - started, load_before=os.getloadavg()[0])
    return result


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = info.get("Model name", model).strip()
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import transformers
    import trl

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def format_table(results: list[dict]) -> str:
    lines = [
        "| workload | run | pairs/s | tokens/s | vs TRL | CPU s/step | vs TRL (CPU) | peak RSS MiB | vs TRL | step-1 loss | step-2 loss"
        " | DPO-step FLOPs / matmul peak | executed FLOPs / matmul peak | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = next((b for b in results if b["workload"] == r["workload"] and b["variant"] == "trl"), None)
        if r["variant"] == "precompute":
            mem = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else ""
            lines.append(
                f"| {r['workload']} | precompute (own process, once) | {r['pairs_per_s']:.2f} | | | | | {r['peak_rss_mib']:.0f} |"
                f" {mem} | | | | | {r['load_before']:.2f} |"
            )
            continue
        speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else ""
        mem = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else ""
        cpu = f"{base['cpu_step_s'] / r['cpu_step_s']:.2f}x" if base else ""  # pairs per CPU-second, relative
        step2 = "" if r.get("loss_step2") is None else f"{r['loss_step2']:.6f}"
        lines.append(
            f"| {r['workload']} | {r['variant']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | {speed} |"
            f" {r['cpu_step_s']:.1f} | {cpu} | {r['peak_rss_mib']:.0f} | {mem} | {r['loss_step1']:.6f} | {step2} |"
            f" {100 * r['flops_per_s'] / r['matmul_peak']:.0f}% | {100 * r['executed_flops_per_s'] / r['matmul_peak']:.0f}% |"
            f" {r['load_before']:.2f} |"
        )
    return "\n".join(lines)


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    doc = path.read_text()
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin) + len(begin)] + "\n" + text + "\n" + doc[doc.index(end) :]
    else:
        doc += f"\n{begin}\n{text}\n{end}\n"
    path.write_text(doc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="a,b,c")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=4, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: the workload's, 8 or 4)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's depth (a quick reduced run)")
    parser.add_argument("--gpu", action="store_true", help="bf16 on one CUDA GPU (workload g)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dpokit-bench"))
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.variant = args.child
        plain_tokenizer_loading()
        {"trl": child_trl, "trl-nogc": child_trl, "precompute": child_precompute}.get(args.child, child_dpokit)(args)
        return 0
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device on this machine")
    cache = Path(args.cache)
    results = []
    for workload in args.workloads.split(","):
        batch = args.batch_size or WORKLOADS[workload].get("batch", 8)
        model, data = build_assets(workload, cache, (args.warmup + args.steps) * batch, layers=args.layers)
        print(format_floor(workload, model), flush=True)
        env = dict(
            os.environ,
            DPOKIT_CACHE=str(cache / f"dpokit-{workload}"),
            TOKENIZERS_PARALLELISM="false",
            TRANSFORMERS_VERBOSITY="error",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_OFFLINE="1",
        )
        shutil.rmtree(cache / f"dpokit-{workload}", ignore_errors=True)  # precompute is measured from scratch
        for variant in args.variants.split(","):
            r = run_child(variant, workload, model, data, args, env, batch)
            print(json.dumps({k: v for k, v in r.items() if k != "memtrace"}), flush=True)
            print(format_trace(r), flush=True)
            results.append(r)
    info = machine()
    header = (
        f"Run {datetime.date.today().isoformat()} on {info['cpu']} ({info['cores']} cores, torch threads "
        f"{info['torch_threads']}{', GPU ' + info['gpu'] if info['gpu'] else ''}); torch {info['torch']}, "
        f"transformers {info['transformers']}, TRL {info['trl']}.\n"
        f"Command: `python bench/dpo_vs_trl.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"load average (1 min) before each run in the last column.\n"
    )
    table = format_table(results)
    print(header)
    print(table)
    if args.write_docs:
        write_docs(header + "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
