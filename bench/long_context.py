"""Long context (issue 22.2): dpokit vs TRL 1.16 on 3k-6k-token pairs, activation bytes per token, the longest pair under a cap.

    python bench/long_context.py run                                   # workload `long`: pairs/s and peak RSS, every variant
    python bench/long_context.py slope --lengths 1500,3000,6000        # peak RSS at three pair lengths: bytes per token
    python bench/long_context.py cap --variants trl --tokens 12000 --cap-gib 16   # one pair length under `ulimit -v 16 GiB`

The model (bench/workloads.py `long`): the Qwen2.5-0.5B layer shape (hidden 896, 14 query / 2 KV heads, intermediate
4864), 4 layers, a 32k vocabulary, tied embeddings, fp32 on CPU; 88.3M parameters. Pairs of the `long` workload: prompt
2000-3000 tokens, completions 500-1500. `slope` and `cap` use pairs of a fixed length T: prompt T/2, chosen and
rejected T/4 each (every pair of a run alike, so a step's peak does not depend on which pairs it drew).

Variants: `trl` (TRL's DPOTrainer, its defaults, gradient checkpointing on), `precompute` (dpokit's reference cache,
its own process, once), `dpokit` (its defaults: packing, prefix sharing, chunked head, checkpointing, cached reference),
`dpokit-tiled` (the same with speed.tiled_mlp=--tile). Each runs in its own process through bench/dpo_vs_trl.py's
children (the same setup `dpokit train` does), with the data limits opened so that no pair is truncated.

Bytes per token: the least-squares slope of the children's peak RSS (ru_maxrss) against the pair's tokens (prompt +
chosen + rejected, the same count for both sides) over the lengths given. The floor, printed beside it: the RSS after
imports, plus weights, gradients and AdamW state in fp32 (16 B a parameter; TRL +4 B for its reference copy).
`--cap-gib`: the child sets RLIMIT_AS (what `ulimit -v` sets) before anything is loaded; a step that cannot allocate
fails the child, which is reported as `fits: false`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_vs_trl as base  # noqa: E402 (bench/ is sys.path[0])
from memtrace import format_trace  # noqa: E402
from workloads import WORKLOADS, memory_floor  # noqa: E402

TILE = 1024
CACHE = Path(tempfile.gettempdir()) / "dpokit-bench-long"


def fixed_workload(tokens: int) -> str:
    """A workload of pairs of exactly `tokens` tokens (prompt T/2, chosen and rejected T/4; EOS counted in each completion)."""
    name = f"long{tokens}"
    p, c = tokens // 2, tokens // 4
    WORKLOADS[name] = {**WORKLOADS["long"], "prompt": (p, p), "completion": (c, tokens - p - c)}
    if tokens - p - c != c:
        raise SystemExit(f"--lengths: use multiples of 4 tokens (got {tokens})")
    return name


# --------------------------------------------------------------------------- the child (one variant, one process)


def child(args) -> None:
    if args.cap_gib:
        cap = int(args.cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    big = 1 << 20
    config = base._dpokit_config

    def opened(a, gc, speed):  # dpo_vs_trl's config, no pair truncated (its workloads stay under 1024 tokens)
        cfg = config(a, gc, speed)
        cfg.data.max_length, cfg.data.max_prompt_length = big, big - 1
        return cfg

    base._dpokit_config = opened
    base._speed_for = lambda variant: {"tiled_mlp": args.tile} if variant == "dpokit-tiled" else {}
    base.plain_tokenizer_loading()
    args.variant = args.child
    args.gpu = False
    {"trl": base.child_trl, "precompute": base.child_precompute}.get(args.child, base.child_dpokit)(args)


def run_child(
    variant: str, model: Path, data: Path, args, batch: int, tokens: int | None = None, cap: float | None = None
) -> dict:
    import subprocess

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
        "--tile",
        str(args.tile),
    ]
    cap = args.cap_gib if cap is None else cap
    if cap:
        cmd += ["--cap-gib", str(cap)]
    env = dict(
        os.environ,
        DPOKIT_CACHE=str(data.parent / "dpokit-cache"),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
    )
    load, started = os.getloadavg()[0], time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    result = {
        "variant": variant,
        "tokens": tokens,
        "load_before": load,
        "wall_s": time.time() - started,
        "model": str(model),
        "cap_gib": cap,
        "fits": proc.returncode == 0 and bool(lines),
    }
    if not result["fits"]:
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip().splitlines()
        result["error"] = next(
            (line for line in reversed(tail) if "Error" in line or "alloc" in line), tail[-1] if tail else ""
        )
        if not cap:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{variant} failed (exit {proc.returncode})")
        return result
    result.update(json.loads(lines[-1][len("BENCH_RESULT ") :]))
    return result


# --------------------------------------------------------------------------- modes


def _assets(name: str, pairs: int, fresh_cache: bool) -> tuple[Path, Path]:
    model, data = base.build_assets(name, CACHE, pairs)
    if fresh_cache:
        shutil.rmtree(data.parent / "dpokit-cache", ignore_errors=True)  # the reference cache is built from scratch
    return model, data


def _record(args, result: dict) -> None:
    print(json.dumps({k: v for k, v in result.items() if k != "memtrace"}), flush=True)
    if result.get("memtrace"):
        print(format_trace({**result, "workload": result.get("tokens") or "long"}), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


def mode_run(args) -> list[dict]:
    model, data = _assets("long", (args.warmup + args.steps) * args.batch_size, "precompute" in args.variants)
    out = []
    for variant in args.variants.split(","):
        out.append(run_child(variant, model, data, args, args.batch_size))
        _record(args, out[-1])
    return out


def mode_lengths(args, lengths: list[int]) -> list[dict]:
    out = []
    for tokens in lengths:
        variants = args.variants.split(",")
        if any(v.startswith("dpokit") for v in variants) and "precompute" not in variants:
            variants.insert(
                0, "precompute"
            )  # the reference cache the dpokit children read (no cap: built once per data)
        model, data = _assets(fixed_workload(tokens), args.warmup + args.steps, "precompute" in variants)
        for variant in variants:
            out.append(
                run_child(variant, model, data, args, 1, tokens, cap=0.0 if variant == "precompute" else args.cap_gib)
            )
            _record(args, out[-1])
    return out


def floor_mib(model: Path, variant: str, imports_mib: float) -> float:
    from transformers import AutoConfig

    f = memory_floor(AutoConfig.from_pretrained(model))
    return imports_mib + (f["floor"] + (f["reference"] if variant == "trl" else 0)) / 2**20


def step_peak(r: dict) -> tuple[float, float]:
    """(highest RSS in the last step's forward and backward, that minus the RSS when the step began), MiB (memtrace).

    The last step (after --warmup) starts with the weights read in, the AdamW state made and the heap warmed; what its
    forward and backward add is the activations, the gradients (freed by zero_grad, the same bytes at every length) and
    the transients.
    """
    rows = r["memtrace"]
    last = max(i for i, row in enumerate(rows) if row["at"].endswith(": forward"))
    peak = max(rows[last]["max_mib"], rows[last + 1]["max_mib"])
    return peak, peak - rows[last - 1]["rss_mib"]


def slope_table(results: list[dict]) -> str:
    """Per variant: forward/backward peak and process peak at each length, above the floor, and the slope in KiB per token."""
    lines = [
        "| run | tokens per pair | peak RSS MiB | imports MiB | peak above floor MiB | last step's forward + backward"
        " above its start MiB | slope KiB/token |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in results if r["variant"] != "precompute" and r.get("fits")):
        rows = [r for r in results if r["variant"] == variant and r.get("fits")]
        xs, ys = [r["tokens"] for r in rows], [step_peak(r)[1] for r in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))
        for i, r in enumerate(rows):
            imports = r["memtrace"][0]["rss_mib"]
            above = r["peak_rss_mib"] - floor_mib(Path(r["model"]), variant, imports)
            cell = f"**{slope * 1024:.0f}**" if i == len(rows) - 1 else ""
            lines.append(
                f"| {variant} | {r['tokens']} | {r['peak_rss_mib']:.0f} | {imports:.0f} | {above:.0f} | {ys[i]:.0f} | {cell} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["run", "slope", "cap"], default="run")
    parser.add_argument("--variants", default="trl,precompute,dpokit,dpokit-tiled")
    parser.add_argument("--lengths", default="1500,3000,6000", help="slope: tokens per pair (multiples of 4)")
    parser.add_argument("--tokens", type=int, default=0, help="cap: tokens per pair")
    parser.add_argument(
        "--cap-gib", type=float, default=0.0, help="RLIMIT_AS of each child (`ulimit -v`), GiB; 0 = none"
    )
    parser.add_argument("--steps", type=int, default=1, help="measured steps after --warmup")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2, help="run: pairs per step (slope and cap: 1)")
    parser.add_argument("--tile", type=int, default=TILE, help="speed.tiled_mlp of dpokit-tiled")
    parser.add_argument("--out", default="", help="append every result as a JSON line to this file")
    parser.add_argument(
        "--table", default="", help="slope: print the table of the results in these JSON-lines files (comma-separated)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.mode == "run":
        results = mode_run(args)
        print(base.format_table([{**r, "workload": "long"} for r in results]))
    elif args.mode == "slope" and args.table:
        print(
            slope_table(
                [json.loads(line) for p in args.table.split(",") for line in Path(p).read_text().splitlines() if line]
            )
        )
    elif args.mode == "slope":
        args.cap_gib = 0.0
        print(slope_table(mode_lengths(args, [int(t) for t in args.lengths.split(",")])))
    else:
        for r in mode_lengths(args, [args.tokens]):
            print(
                f"{r['variant']}: {r['tokens']} tokens under {args.cap_gib} GiB: {'fits' if r['fits'] else 'fails: ' + r.get('error', '')}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
