"""`dpokit demo`: build (or reuse) the SFT model and pairs, run DPO with the shipped config, compare.

The DPO step is an ordinary `dpokit.train` of the shipped `demo` config, so the
demo shows exactly what `dpokit train demo` does; only the before/after
evaluation is demo-specific (it needs the world's true sentiment reward).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dpokit.config import shipped_config
from dpokit.demo import world
from dpokit.demo.assets import demo_paths
from dpokit.demo.sft import DEMO_THREADS
from dpokit.online.demo_eval import evaluate_policy, format_table
from dpokit.online.loading import load_model
from dpokit.training.loop import train

N_EVAL_PROMPTS = 64
SAMPLES_PER_PROMPT = 4


def _read_pairs(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_demo(out_dir: str = "runs/demo", overrides: list[str] | None = None) -> dict:
    import transformers  # lazy: keeps `dpokit --help` fast; the run imports it anyway

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(DEMO_THREADS)  # the sampling too: the docs' table on any number of cores (demo/sft.py)
    started = time.time()
    print("[demo] building (or reusing) the SFT model of the review language and its preference pairs ...", flush=True)
    paths = demo_paths()
    print(f"[demo] ready in {time.time() - started:.1f}s: model {paths['sentiment-sft']}", flush=True)

    result = train(str(shipped_config("demo")), list(overrides or []) + [f"out_dir={out_dir}"])

    # through the one loader, with its safety checks; kept on the CPU, where the demo has always evaluated
    reference, tokenizer = load_model(paths["sentiment-sft"], device="cpu")
    policy, _ = load_model(str(result.model_dir), device="cpu")
    prompts = world.eval_prompts(N_EVAL_PROMPTS, seed=0)
    eval_pairs = _read_pairs(paths["sentiment-eval"])
    # The same prompts, independent seeds: one seed would make both models draw from the same random
    # numbers, and every sample DPO barely changed would be printed twice, word for word.
    before = evaluate_policy(
        reference, reference, tokenizer, prompts, eval_pairs, SAMPLES_PER_PROMPT, seed=0, progress="SFT"
    )
    after = evaluate_policy(
        policy, reference, tokenizer, prompts, eval_pairs, SAMPLES_PER_PROMPT, seed=1, progress="DPO"
    )
    wall = time.time() - started
    print()
    print(format_table(before, after))
    print(f"\n[demo] wall time {wall:.0f}s; run directory {result.run_dir} (with report.html)")
    report = {"before": before, "after": after, "wall_seconds": round(wall, 1), "train_metrics": result.metrics}
    (Path(result.run_dir) / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
