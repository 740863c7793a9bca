"""dpokit vs TRL 1.16's DPOTrainer, side by side, each run in its own process.

    python bench/dpo_vs_trl.py                       # workloads a, b, c on CPU, fp32; prints the table
    python bench/dpo_vs_trl.py --workloads b --steps 4 --write-docs   # and writes it into docs/benchmarks.md
    python bench/dpo_vs_trl.py --workloads a,b,c --steps 4 --warmup 1 --repeat 3   # each variant's median of 3 runs in turn
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
The trl and dpokit-step children print a memory trace: RSS at the end of each phase and the highest RSS inside it
(bench/memtrace.py).

Runs per workload (`--variants`):
  trl           TRL's DPOTrainer with its defaults (gradient checkpointing on), fp32
  trl-nogc      the same without gradient checkpointing
  precompute    `dpokit precompute CONFIG` through its front door (bench/front_door.py), its own process: the
                reference log-probs of the run's pairs, which the dpokit runs then read from the cache
  dpokit        `dpokit train CONFIG` through its front door (bench/front_door.py: a fresh process that imports
                dpokit first and runs dpokit.cli.main, so its thread setup is the command's): dpokit's defaults,
                packing, prefix sharing, chunked LM head, gradient checkpointing (on by default, like TRL),
                reference log-probs from the cache `precompute` built; a metrics record every step, no
                evaluation, no checkpoint (the final model is saved after the last step, outside the timing)
  dpokit-nogc   the same with train.gradient_checkpointing=false
  dpokit-live   no reference cache (speed.ref_cache=false): a live reference model in memory and its
                forward every step
  dpokit-plain  every speed option off (the padded [chosen; rejected] batch, full logits)
  dpokit-step   dpokit's step alone, in this process (the setup `dpokit train` does, called piece by piece:
                load_policy with its thread setup, fit_speed, reference_for, make_optimizer, then
                accumulate_gradients, clipping and AdamW in the bench's own loop), with a memory trace of
                every phase: what docs/benchmarks.md's "where peak memory goes" reads

The dpokit runs train the same pairs in the same order as TRL's sequential sampler: the pairs are written,
once per (workload, batch size, train.seed), in the order that makes `dpokit train`'s seeded shuffle visit them
in their given order (front_door.file_order); every dpokit run, and the cache, read that file.

Reported per run: pairs/s and tokens/s after `--warmup` steps (tokens = prompt + chosen +
rejected words of the pairs, so both sides count the same work); CPU seconds per step (all the
process's threads); peak RSS of the process (`ru_maxrss`, the whole process from start: imports,
weights, optimizer, activations); step-1 and step-2 loss; the threads the run used (torch's
intra-op threads and OpenMP's wait policy: `dpokit train`'s own "CPU threads" line, for TRL the
OMP_WAIT_POLICY it ran under); and the fraction of this machine's matmul peak reached: model FLOPs
of the DPO step / step time / `torch.matmul` FLOP/s measured in the child before the run.
Where each comes from: TRL and dpokit-step time each step in their own process (time.perf_counter,
time.process_time, getrusage(RUSAGE_SELF)); the front-door runs take each step's seconds and loss
from the run's metrics.jsonl (front_door.step_seconds), its CPU seconds from /proc/PID/stat read as
each record appeared (the record-to-record interval: collation and logging included), its peak RSS
from wait4's rusage of the `dpokit` process.
Model FLOPs per step, the same numerator for every run: for each of the
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
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from front_door import file_order, in_stream_order, launch, per_step_between, step_seconds, threads_label  # noqa: E402 (bench/ is sys.path[0])
from memtrace import MemTrace, format_floor, format_trace  # noqa: E402
from workloads import WORKLOADS, model_config  # noqa: E402

VARIANTS = ["trl", "trl-nogc", "precompute", "dpokit", "dpokit-nogc", "dpokit-live", "dpokit-step"]
FRONT_DOOR = ("dpokit", "dpokit-nogc", "dpokit-live", "dpokit-plain")  # `dpokit train` CONFIG, its own process
USER_ENV = dict(os.environ)  # what the children start from: not what importing dpokit here would add (OMP_WAIT_POLICY)
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
    cpu_step_s: float | None,
    peak_rss: float,
) -> dict:
    """cpu_step_s: the process's CPU seconds per measured step (all threads), which other jobs on the machine do not
    inflate as they do wall time; None where it could not be read. peak_rss: the process's ru_maxrss, MiB."""
    measured = times[warmup:]
    elapsed = sum(measured)
    steps = len(measured)
    tokens = sum(p + c + r for p, c, r in lengths[warmup * batch : (warmup + steps) * batch])
    return {
        "pairs_per_s": steps * batch / elapsed,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / steps,
        "cpu_step_s": cpu_step_s,
        "loss_step1": losses[0],
        "loss_step2": losses[1] if len(losses) > 1 else None,
        "flops_per_s": sum(flops_per_step[warmup:]) / elapsed,
        "executed_flops_per_s": sum(executed_per_step[warmup : warmup + steps]) / elapsed,
        "matmul_peak": peak,
        "peak_rss_mib": peak_rss,
    }


def _cpu_per_step(cpu_times: list[float], warmup: int) -> float:
    return sum(cpu_times[warmup:]) / len(cpu_times[warmup:])


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
    summary = _summarise(
        times,
        losses,
        lengths,
        args.warmup,
        args.batch_size,
        flops,
        peak,
        executed,
        _cpu_per_step(cpu_times, args.warmup),
        peak_rss_mib(),
    )
    threads = f"{torch.get_num_threads()} (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY') or 'unset'})"  # as TRL's users run it
    _report({**summary, "threads": threads, "memtrace": trace.rows})


def _dpokit_config(args, gc: bool, speed: dict):
    """dpokit's config of a run; data.path is the run's pairs in the order that trains them in TRL's order."""
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
    n = (args.warmup + args.steps) * args.batch_size
    cfg.data.path = str(_pairs_in_stream_order(Path(args.data), n, args.batch_size, cfg.train.seed))
    return cfg


def _speed_for(variant: str) -> dict:
    if variant == "dpokit-live":
        return {"ref_cache": False}
    if variant == "dpokit-plain":
        return {"packing": False, "prefix_sharing": False, "chunked_logps": False, "ref_cache": False}
    return {}


def _pairs_in_stream_order(data: Path, n: int, batch: int, seed: int) -> Path:
    """The first n pairs of `data` (TRL's, in its sequential order), laid out so that `dpokit train`'s seeded shuffle
    trains them in that order (front_door.file_order); the same file for every dpokit run and the reference cache."""
    rows = data.read_text().splitlines()[:n]
    path = data.with_name(f"{data.stem}.stream-order-{len(rows)}x{batch}-seed{seed}.jsonl")
    text = "".join(row + "\n" for row in file_order(rows, batch, seed))
    if not path.exists() or path.read_text() != text:
        part = path.with_name(path.name + f".{os.getpid()}.tmp")
        part.write_text(text)
        part.replace(path)
    return path


def _front_door_files(args, cfg, verb: str) -> tuple[Path, Path]:
    """(a fresh work folder, CONFIG.yaml written in it): the run's config, a metrics record every step, no
    checkpoint, no evaluation (no eval data), its out_dir in the work folder."""
    work = Path(tempfile.mkdtemp(prefix=f"dpokit-bench-{verb}-"))
    cfg.out_dir = str(work / "run")
    cfg.train.logging_steps, cfg.train.save_steps, cfg.train.resume, cfg.train.progress_bar = 1, 0, "never", False
    cfg.data.eval_path, cfg.data.eval_fraction = None, 0.0
    cfg.save(work / "config.yaml")
    return work, work / "config.yaml"


def _launched(verb: str, work: Path, config: Path, metrics: Path | None = None):
    """front_door.launch, with the console printed and the child failed if the verb failed."""
    done = launch(verb, config, work / "console.txt", env=dict(os.environ), metrics=metrics)
    print(done.console, flush=True)
    if done.status != 0:
        raise SystemExit(f"dpokit {verb} {config} failed (exit {done.status})")
    return done


def child_precompute(args) -> None:
    """`dpokit precompute CONFIG` through its front door: pairs/s over the cache build it reports ("built in Xs":
    fingerprint, reference load, forwards, write), its whole process's wall time, peak RSS and threads."""
    cfg = _dpokit_config(args, gc=False, speed={})
    work, config = _front_door_files(args, cfg, "precompute")
    done = _launched("precompute", work, config)
    built = re.search(r"built in ([0-9.]+)s", done.console)
    n = len(Path(cfg.data.path).read_text().splitlines())
    seconds = float(built.group(1)) if built else None
    _report(
        {
            "pairs_per_s": n / seconds if seconds else None,
            "seconds": seconds,
            "built": bool(built),
            "process_s": done.wall_s,
            "cpu_s": done.cpu_s,
            "peak_rss_mib": done.peak_rss_mib,
            "threads": threads_label(done.threads),
        }
    )
    shutil.rmtree(work, ignore_errors=True)


def _lengths_in_step_order(cfg, batch: int) -> list[tuple]:
    """(prompt, chosen, rejected) tokens of the run's pairs as dpokit tokenises them, in the order they are trained."""
    from dpokit.models import load_tokenizer
    from dpokit.steps import step_for

    tokenizer = load_tokenizer(cfg)
    pairs = in_stream_order(step_for(cfg).prepare(cfg, tokenizer).train, batch, cfg.train.seed)
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    assert min(p for p, _, _ in lengths) > 8, "the tokenizer dropped the words: check plain_tokenizer_loading"
    return lengths


def child_front_door(args) -> None:
    """`dpokit train CONFIG` through its front door (front_door.launch): step seconds and losses from its metrics.jsonl,
    CPU seconds per step from /proc as each record appeared, peak RSS from wait4, the threads it used."""
    from transformers import AutoConfig

    from dpokit.config import load_config
    from dpokit.training.metrics import read_metrics

    device = "cuda" if args.gpu else "cpu"
    peak = matmul_peak(device, "bfloat16" if args.gpu else "float32")
    cfg = _dpokit_config(args, gc=args.variant != "dpokit-nogc", speed=_speed_for(args.variant))
    lengths = _lengths_in_step_order(cfg, args.batch_size)
    work, config = _front_door_files(args, cfg, "train")
    done = _launched("train", work, config, metrics=work / "run" / "metrics.jsonl")
    assert "computed in" not in done.console, (
        "run the precompute variant first (the reference cache was built in the run)"
    )
    records = [r for r in read_metrics(work / "run" / "metrics.jsonl") if "tokens_per_second" in r]
    total, batch = args.warmup + args.steps, args.batch_size
    batches = [lengths[i * batch : (i + 1) * batch] for i in range(total)]
    expected = [sum(2 * p + c + r for p, c, r in b) for b in batches]  # pair_tokens: what num_tokens counts
    got = [r["num_tokens"] - (records[i - 1]["num_tokens"] if i else 0) for i, r in enumerate(records)]
    assert got == expected, (
        f"the run did not train the bench's pairs in order: tokens per step {got}, expected {expected}"
    )
    ran = load_config(str(work / "run" / "config.yaml"))  # the config that ran, after dpokit's adjustments
    model_config = AutoConfig.from_pretrained(args.model)
    flops = [model_flops(b, model_config) for b in batches]
    speed = ran.speed
    executed = [
        executed_flops(
            b,
            model_config,
            shared=speed.prefix_sharing,
            reference=not speed.ref_cache,
            head_everywhere=not speed.any_fast_path,
        )
        for b in batches
    ]
    cpu_step_s, observed = per_step_between(
        done.seen, args.warmup, args.steps
    )  # record to record: collation, logging in
    summary = _summarise(
        step_seconds(records),
        [r["loss"] for r in records],
        lengths,
        args.warmup,
        batch,
        flops,
        peak,
        executed,
        cpu_step_s,
        done.peak_rss_mib,
    )
    _report(
        {
            **summary,
            "threads": threads_label(done.threads),
            "record_to_record_step_s": observed,
            "process_s": done.wall_s,
            "process_cpu_s": done.cpu_s,
        }
    )
    shutil.rmtree(work, ignore_errors=True)


def child_dpokit(args) -> None:
    """The `dpokit-step` variant: dpokit's training step as `dpokit train` sets it up, called piece by piece in this
    process (steps.step_for, models.load_policy and the CPU threads it sets, training.setup.fit_speed and reference_for,
    training.optim.make_optimizer), timed step by step in the bench's own loop, with a memory trace of every phase.
    main() imports dpokit before torch, as the `dpokit` command does (OpenMP's wait policy)."""
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
    from dpokit.cpu_threads import cpu_threads_note
    from dpokit import openmp

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
    policy = load_policy(
        cfg
    )  # sets torch's CPU threads (cpu_threads.set_cpu_threads, train.num_threads), as in training
    trace.mark("policy loaded, data tokenised")
    for note in cpu_threads_note(policy):
        print(f"[dpokit] {note}", flush=True)
    threads = (
        f"{torch.get_num_threads()} ({'passive' if openmp.PASSIVE_WAIT else 'active'})" if not args.gpu else "GPU run"
    )
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
    pairs = in_stream_order(
        data.train, args.batch_size, cfg.train.seed
    )  # the order `dpokit train` trains them in: TRL's
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
    summary = _summarise(
        times,
        losses,
        lengths,
        args.warmup,
        args.batch_size,
        flops,
        peak,
        executed,
        _cpu_per_step(cpu_times, args.warmup),
        peak_rss_mib(),
    )
    _report({**summary, "threads": threads, "memtrace": trace.rows})


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
    started, load = time.time(), os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{variant} on workload {workload} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("BENCH_RESULT ") :])
    result.update(
        variant=variant, workload=workload, wall_s=time.time() - started, load_before=load, load_end=os.getloadavg()[0]
    )
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


def median_runs(runs: list[dict]) -> list[dict]:
    """Per variant, in the order they first ran: its run with the median pairs/s (of an even count, the lower middle
    one), with every run's pairs/s, sorted, in `pairs_per_s_runs`."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        same = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["pairs_per_s"] or 0.0)
        out.append({**same[(len(same) - 1) // 2], "pairs_per_s_runs": [r["pairs_per_s"] for r in same]})
    return out


def _num(x: float | None) -> str:
    """pairs/s to 3 significant digits below 1 (q05's 0.052), 2 decimals above; '' for None."""
    return "" if x is None else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def format_table(results: list[dict]) -> str:
    many = any(len(r.get("pairs_per_s_runs", [])) > 1 for r in results)
    lines = [
        "| workload | run | threads | pairs/s"
        + (" (median) | pairs/s of each run" if many else "")
        + " | tokens/s | vs TRL | CPU s/step"
        " | vs TRL (CPU) | peak RSS MiB | vs TRL | step-1 loss | step-2 loss | DPO-step FLOPs / matmul peak"
        " | executed FLOPs / matmul peak | load avg (start / end) |",
        "|---|---|---|---:|" + ("---|" if many else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        each = f" {', '.join(_num(x) for x in r.get('pairs_per_s_runs', []))} |" if many else ""
        base = next((b for b in results if b["workload"] == r["workload"] and b["variant"] == "trl"), None)
        load = f"{r['load_before']:.2f}" + (
            f" / {r['load_end']:.2f}" if "load_end" in r else ""
        )  # bench/long_context.py: start only
        mem = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else ""
        if r["variant"] == "precompute":
            lines.append(
                f"| {r['workload']} | precompute (own process, once) | {r.get('threads', '')} | {_num(r['pairs_per_s'])} |{each} | | | |"
                f" {r['peak_rss_mib']:.0f} | {mem} | | | | | {load} |"
            )
            continue
        speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else ""
        cpu_step, cpu = "", ""
        if r.get("cpu_step_s"):
            cpu_step = f"{r['cpu_step_s']:.2f}" if r["cpu_step_s"] < 10 else f"{r['cpu_step_s']:.1f}"
            cpu = (
                f"{base['cpu_step_s'] / r['cpu_step_s']:.2f}x" if base and base.get("cpu_step_s") else ""
            )  # pairs per CPU-second, relative
        step2 = "" if r.get("loss_step2") is None else f"{r['loss_step2']:.6f}"
        lines.append(
            f"| {r['workload']} | {r['variant']} | {r.get('threads', '')} | {_num(r['pairs_per_s'])} |{each} {r['tokens_per_s']:.0f} | {speed} |"
            f" {cpu_step} | {cpu} | {r['peak_rss_mib']:.0f} | {mem} | {r['loss_step1']:.6f} | {step2} |"
            f" {100 * r['flops_per_s'] / r['matmul_peak']:.0f}% | {100 * r['executed_flops_per_s'] / r['matmul_peak']:.0f}% |"
            f" {load} |"
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
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the variants this many times in turn; the table has each one's median",
    )
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
        if not args.child.startswith("trl"):
            import dpokit  # noqa: F401 - before torch, as the `dpokit` command imports it (OpenMP's wait policy, dpokit/openmp.py)
        plain_tokenizer_loading()
        children = {
            "trl": child_trl,
            "trl-nogc": child_trl,
            "precompute": child_precompute,
            "dpokit-step": child_dpokit,
            **{variant: child_front_door for variant in FRONT_DOOR},
        }
        children[args.child](args)
        return 0
    unknown = set(args.variants.split(",")) - {*VARIANTS, *FRONT_DOOR}
    if unknown:
        raise SystemExit(
            f"--variants: unknown {', '.join(sorted(unknown))}; known: {', '.join(dict.fromkeys(VARIANTS + list(FRONT_DOOR)))}"
        )
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
            USER_ENV,
            DPOKIT_CACHE=str(cache / f"dpokit-{workload}"),
            TOKENIZERS_PARALLELISM="false",
            TRANSFORMERS_VERBOSITY="error",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_OFFLINE="1",
        )
        runs = []
        for _ in range(args.repeat):  # in turn, so that a burst of other jobs does not fall on one variant's every run
            for variant in args.variants.split(","):
                if variant == "precompute":
                    shutil.rmtree(
                        cache / f"dpokit-{workload}", ignore_errors=True
                    )  # precompute is measured from scratch
                r = run_child(variant, workload, model, data, args, env, batch)
                print(json.dumps({k: v for k, v in r.items() if k != "memtrace"}), flush=True)
                print(f"{workload} / {variant}: threads {r.get('threads', '')}", flush=True)
                if r.get("memtrace"):
                    print(format_trace(r), flush=True)
                runs.append(r)
        results += median_runs(runs)
    info = machine()
    header = (
        f"Run {datetime.date.today().isoformat()} on {info['cpu']} ({info['cores']} cores"
        f"{', GPU ' + info['gpu'] if info['gpu'] else ''}; the threads each run used in its column); torch {info['torch']}, "
        f"transformers {info['transformers']}, TRL {info['trl']}.\n"
        f"Command: `python bench/dpo_vs_trl.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"load average (1 min) at the start and the end of each run in the last column.\n"
    )
    table = format_table(results)
    print(header)
    print(table)
    if args.write_docs:
        write_docs(header + "\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
