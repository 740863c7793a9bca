"""train.fsdp=true, memory per process, measured: 1 vs 2 processes on the Qwen2.5-0.5B layer shape at reduced depth.

    python bench/fsdp_memory.py                      # q05 vocabulary (151,936), --layers 4; about 2 min on 2 cores
    python bench/fsdp_memory.py --layers 2 --runs fsdp-1,fsdp-2

Each run is a real `dpokit.train` in a `python -m torch.distributed.run --nproc_per_node N` child (the same
front door as tests/test_fsdp.py), with OMP_NUM_THREADS=1, train.batch_size=1 per process (so every process
holds the same activations), short pairs, 2 optimizer steps, the reference log-probs from the cache (no
reference model), no checkpoints. Runs (`--runs`):

  plain-1   one process, train.fsdp=false (the fused AdamW, chunked LM head: a reference point)
  fsdp-1    one process, train.fsdp=true (FSDP2 over a group of one: nothing is split)
  fsdp-2    two processes, train.fsdp=true (every parameter, gradient and AdamW moment split in two)

The child wraps names of dpokit.training.loop and dpokit.training.setup, calling the originals unchanged,
and writes one JSON per rank: RSS (/proc/self/statm; the highest RSS of each phase from a 10 ms sampler,
bench/memtrace.py; RssAnon, RssFile and VmHWM of /proc/self/status) at

  imports          right after `import dpokit.training.loop` (torch, transformers, accelerate): the baseline
  load             after load_policy: the whole model in every process (transformers maps the safetensors
                   file: its pages become resident as they are first read)
  shard            after fsdp.shard (train.fsdp): every parameter copied into this process's shard
  reference cache  after ensure_reference_cache: the reference log-probs, computed by the (sharded) policy
  step N backward  at clip_grad_norm of step N: the gradients are live
  step N end       after optimizer_step N (AdamW step, zero_grad(set_to_none=True): gradients freed)

and the bytes of this process's tensors, counted from their storages (a DTensor's local shard, padding
included): parameters and AdamW state (exp_avg, exp_avg_sq, step) after step 2, gradients at step 2's clip.
The table then compares weights + gradients + AdamW per process with `dpokit plan --gpus N` of the same config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

MIB = 2**20
RUNS = {"plain-1": (1, False), "fsdp-1": (1, True), "fsdp-2": (2, True)}

CHILD = """
import json, os, sys
sys.path.insert(0, {bench!r})
out, cfg = sys.argv[1], json.loads(sys.argv[2])
from fsdp_memory import child
child(out, cfg)
"""


# --------------------------------------------------------------------------- child (one per rank)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under these tensors (a DTensor: its local shard; a tied weight once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _optimizer_tensors(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)
    return [v for state in inner.state.values() for v in state.values() if hasattr(v, "untyped_storage")]


def _status() -> dict:
    """MiB of /proc/self/status: VmHWM (the process's exact peak RSS so far), RssAnon (heap), RssFile (mapped files)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k.lower(): int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}


def child(out: str, cfg: dict) -> None:
    """One rank: hooks around dpokit.training.loop and .setup, then dpokit.train(cfg); writes out/rank<R>.json."""
    from memtrace import MemTrace

    class Trace(MemTrace):
        def mark(self, at: str) -> None:
            super().mark(at)
            self.rows[-1].update(_status())

    trace = Trace()
    from dpo_vs_trl import plain_tokenizer_loading

    from dpokit.training import (  # torch, transformers, accelerate, dpokit: the process baseline
        loop,
        setup,
    )

    plain_tokenizer_loading()
    rank = int(os.environ.get("RANK", "0"))
    trace.mark("imports")
    record = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "bytes": {}}
    current = [0]

    def wrap(name, before=None, after=None, module=loop):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            if before:
                before(*args, **kwargs)
            result = original(*args, **kwargs)
            if after:
                after(result, *args, **kwargs)
            return result

        setattr(module, name, wrapped)

    def loaded(policy, *_a, **_k):
        trace.mark("load")
        record["bytes"]["load_params"] = _storage_bytes(policy.parameters())

    def sharded(model, *_a, **_k):
        trace.mark("shard")
        record["bytes"]["shard_params"] = _storage_bytes(model.parameters())

    def cached(*_a, **_k):
        trace.mark("reference cache")

    def backward_done(accelerator, policy, params, max_norm):
        trace.mark(f"step {current[0]} backward")
        if current[0] == 2:
            record["bytes"]["grads"] = _storage_bytes(p.grad for p in params)

    def step_begin(run, step):
        current[0] = step

    def step_done(result, run, step):
        trace.mark(f"step {step} end")
        if step == 2:
            record["bytes"]["params"] = _storage_bytes(run.setup.policy.parameters())
            record["bytes"]["adamw"] = _storage_bytes(_optimizer_tensors(run.setup.optimizer))
            record["trace"] = trace.rows
            Path(out, f"rank{rank}.json").write_text(json.dumps(record, indent=1))

    wrap("load_policy", after=loaded)
    wrap("shard", after=sharded, module=setup)  # train.fsdp: the policy, in reference_for
    wrap(
        "ensure_reference_cache", after=cached, module=setup
    )  # the reference log-probs, computed by the (sharded) policy
    wrap("clip_grad_norm", before=backward_done)
    wrap("optimizer_step", before=step_begin, after=step_done)
    import dpokit

    dpokit.train(cfg)
    trace.mark("end of run (final model saved)")
    record["trace"] = trace.rows
    Path(out, f"rank{rank}.json").write_text(json.dumps(record, indent=1))


# --------------------------------------------------------------------------- orchestration


def short_pairs(path: Path, vocab: int, n: int, prompt: int, completion: int, seed: int = 0) -> Path:
    """n text pairs of the word-level tokenizer's words: prompt words, then two completions (EOS appended by dpokit)."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(f"t{rng.randrange(vocab - 5)}" for _ in range(k))

    path.write_text(
        "".join(
            json.dumps({"prompt": text(prompt), "chosen": " " + text(completion), "rejected": " " + text(completion)})
            + "\n"
            for _ in range(n)
        )
    )
    return path


def run_config(model: Path, data: Path, work: Path, name: str, fsdp: bool, args) -> dict:
    return {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "data": {"path": str(data), "max_length": 2 * args.completion + args.prompt, "max_prompt_length": args.prompt},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "optim": {"lr": 1e-4, "scheduler": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0},
        "speed": {"ref_cache_dir": str(work / f"cache-{name}")},
        "train": {
            "batch_size": 1,
            "max_steps": 2,
            "logging_steps": 1,
            "save_steps": 0,
            "progress_bar": False,
            "fsdp": fsdp,
        },
        "out_dir": str(work / f"run-{name}"),
    }


def launch(name: str, procs: int, cfg: dict, work: Path, port: int) -> list[dict]:
    out = work / f"mem-{name}"
    out.mkdir(parents=True, exist_ok=True)
    script = work / "fsdp_memory_child.py"
    script.write_text(CHILD.format(bench=str(ROOT / "bench")))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(procs),
        "--master_port",
        str(port),
        str(script),
        str(out),
        json.dumps(cfg),
    ]
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    print(f"{name}: {procs} process(es), {time.time() - started:.0f} s", flush=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


def plan_parts(cfg_path: Path, gpus: int) -> tuple[dict, dict, str]:
    """`dpokit plan CONFIG --gpus N` (its printout), and that plan's parts in bytes as the command computes them (GPU: a
    CUDA runtime allowance, the for-each AdamW's temporaries) and as its CPU mode does (device="cpu", no runtime allowance:
    what tests/test_plan.py checks against peak RSS)."""
    from dpokit.config import load_config
    from dpokit.plan import plan_memory, read_model_shape

    text = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", "plan", str(cfg_path), "--gpus", str(gpus)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    ).stdout
    cfg = load_config(str(cfg_path))
    shape = read_model_shape(cfg.model.name_or_path)
    gpu = {p.name: p.bytes for p in plan_memory(cfg, shape, gpus).parts}
    cpu = {p.name: p.bytes for p in plan_memory(cfg, shape, gpus, runtime=0, device="cpu").parts}
    return gpu, cpu, text


def _row(trace: list[dict], at: str) -> dict | None:
    return next((r for r in trace if r["at"] == at), None)


def summarise(name: str, ranks: list[dict]) -> list[dict]:
    """Per rank, MiB: RSS growth over the baseline (RSS after imports) at each point, phase peaks, tensor bytes."""
    rows = []
    for r in ranks:
        t, b = r["trace"], r["bytes"]
        base = _row(t, "imports")["rss_mib"]

        def at(point, key="rss_mib", t=t, base=base):
            return (_row(t, point) or {key: math.nan})[key] - base

        steps = [x for x in t if x["at"].startswith("step ")]
        setup = [x for x in t if not x["at"].startswith(("step ", "end"))]
        rows.append(
            {
                "run": name,
                "rank": r["rank"],
                "world": r["world"],
                "base": base,
                "load": at("load"),
                "load_file": at("load", "rssfile"),
                "shard_peak": at("shard", "max_mib"),
                "shard": at("shard"),
                "cache_peak": at("reference cache", "max_mib"),
                "cache": at("reference cache"),
                "setup_peak": max(x["max_mib"] for x in setup) - base,
                "bwd2": at("step 2 backward"),
                "end2": at("step 2 end"),
                "end2_anon": at("step 2 end", "rssanon"),
                "train_peak": max(x["max_mib"] for x in steps) - base,
                "hwm": at("step 2 end", "vmhwm"),
                "w": b["params"] / MIB,
                "g": b["grads"] / MIB,
                "a": b["adamw"] / MIB,
            }
        )
    return rows


def _f(x: float, sign: str = "+") -> str:
    return "" if math.isnan(x) else f"{sign}{x:.0f}"


def table(rows: list[dict]) -> str:
    lines = [
        (
            "| run | rank | baseline RSS (after imports) | after load | sharding: phase peak / after | reference cache: phase peak / after"
            " | step 2 backward (grads live) | step 2 end | peak in steps 1-2 | weights | grads | AdamW state | W+G+A |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shard = "no sharding" if math.isnan(r["shard"]) else f"{_f(r['shard_peak'])} / {_f(r['shard'])}"
        lines.append(
            f"| {r['run']} | {r['rank']} | {r['base']:.0f} | {_f(r['load'])} | {shard} |"
            f" {_f(r['cache_peak'])} / {_f(r['cache'])} | {_f(r['bwd2'])} | {_f(r['end2'])} | {_f(r['train_peak'])} |"
            f" {r['w']:.0f} | {r['g']:.0f} | {r['a']:.0f} | {r['w'] + r['g'] + r['a']:.0f} |"
        )
    return "\n".join(lines)


def plan_table(rows: list[dict], plans: dict) -> str:
    """`dpokit plan --gpus N` against the measured tensors per rank (weights + grads + AdamW) and the measured peak."""
    lines = [
        (
            "| run | `dpokit plan` | plan W+G+A per process | measured W+G+A per process (tensors) | plan / measured"
            " | W+G+A over all processes | plan peak, CPU mode | measured peak in steps 1-2 (RSS growth) | plan / measured |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["run"] for r in rows):
        ranks = [r for r in rows if r["run"] == name]
        gpu, cpu = plans[ranks[0]["world"]]
        plan_wga = (gpu["weights"] + gpu["gradients"] + gpu["optimizer"]) / MIB
        wga = sum(r["w"] + r["g"] + r["a"] for r in ranks) / len(ranks)
        peak = sum(r["train_peak"] for r in ranks) / len(ranks)
        plan_peak = sum(cpu.values()) / MIB
        lines.append(
            f"| {name} | --gpus {ranks[0]['world']} | {plan_wga:.0f} | {wga:.0f} | {plan_wga / wga:.2f} |"
            f" {sum(r['w'] + r['g'] + r['a'] for r in ranks):.0f} | {plan_peak:.0f} | {peak:.0f} | {plan_peak / peak:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="q05")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--prompt", type=int, default=24, help="prompt words of each pair")
    parser.add_argument("--completion", type=int, default=16, help="words of each completion")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dpokit-bench"))
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (per-rank JSON, run folders with final/)"
    )
    args = parser.parse_args(argv)

    from dpo_vs_trl import build_assets
    from memtrace import format_floor
    from workloads import WORKLOADS

    cache = Path(args.cache)
    model, _ = build_assets(
        args.workload, cache, 4, layers=args.layers
    )  # the model folder (its own long pairs are not used)
    print(format_floor(args.workload, model), flush=True)
    work = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    data = short_pairs(work / "pairs.jsonl", WORKLOADS[args.workload]["vocab"], 8, args.prompt, args.completion)
    plans, rows = {}, []
    for i, name in enumerate(args.runs.split(",")):
        procs, fsdp = RUNS[name]
        cfg = run_config(model, data, work, name, fsdp, args)
        cfg_path = work / f"{name}.json"
        cfg_path.write_text(json.dumps(cfg))
        if procs not in plans:
            gpu, cpu, text = plan_parts(cfg_path, procs)
            plans[procs] = gpu, cpu
            print(f"$ dpokit plan {name}.json --gpus {procs}\n{text}", flush=True)
        ranks = launch(name, procs, cfg, work, 29500 + os.getpid() % 400 + i)
        if not args.keep:  # the run's final/ is a whole model (~0.75 GiB at 4 layers)
            shutil.rmtree(work / f"run-{name}", ignore_errors=True)
        for r in ranks:
            print(f"{name} rank {r['rank']} trace (MiB: point, RSS, phase peak):", flush=True)
            for x in r["trace"]:
                print(
                    f"  {x['at']:<32} {x['rss_mib']:8.0f} {x['max_mib']:8.0f}  anon {x['rssanon']:6.0f}  file {x['rssfile']:6.0f}"
                    f"  VmHWM {x['vmhwm']:6.0f}",
                    flush=True,
                )
        rows += summarise(name, ranks)
    print(
        f"\nMiB; RSS columns are growth over the baseline (RSS after imports); {os.cpu_count()} cores, OMP_NUM_THREADS=1, "
        f"load average {os.getloadavg()[0]:.2f} at the end\n"
    )
    print(table(rows))
    print()
    print(plan_table(rows, plans))
    if args.keep:
        print(f"\nper-rank JSON and run folders: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    one = [r for r in rows if r["run"] == "fsdp-1"]
    two = [r for r in rows if r["run"] == "fsdp-2"]
    if one and two:

        def wga(r):
            return r["w"] + r["g"] + r["a"]

        print(
            f"\nfsdp-2 / fsdp-1 per rank: tensors W+G+A {sum(map(wga, two)) / len(two) / wga(one[0]):.3f}, "
            f"RSS at step 2 backward {sum(r['bwd2'] for r in two) / len(two) / one[0]['bwd2']:.3f}, "
            f"RSS at step 2 end {sum(r['end2'] for r in two) / len(two) / one[0]['end2']:.3f}, "
            f"peak in steps 1-2 {sum(r['train_peak'] for r in two) / len(two) / one[0]['train_peak']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
