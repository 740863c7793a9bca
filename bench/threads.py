"""CPU threads and OpenMP's wait policy, timed through `dpokit train`'s front door (issue 22.0).

Times the whole `dpokit train` process at 20 and at 4 optimizer steps on workload b of bench/workloads.py
(prompts 50-600 tokens, completions 20-400, the 4M-parameter CPU Llama, batch 4) and reports the
seconds per step as (t20 - t4) / 16, so start-up and data preparation cancel. Each setting runs on an
idle machine and again with one core held busy by a spinning process. The threads a run used are read
from its own console line ("CPU threads: N (OpenMP waits ...)").

  python bench/threads.py                      # every setting, idle and busy
  python bench/threads.py --settings auto,1    # a subset
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import build_assets  # noqa: E402

# name -> (environment changes, config overrides)
SETTINGS = {
    "auto": ({}, []),  # dpokit's default: OMP_WAIT_POLICY=PASSIVE set on import, torch's thread count
    "2-active": ({"OMP_WAIT_POLICY": "ACTIVE"}, ["train.num_threads=2"]),
    "2-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["train.num_threads=2"]),
    "1": ({}, ["train.num_threads=1"]),  # the rule before: one thread for models under 50M parameters
    "2-libgomp-default": ({"OMP_WAIT_POLICY": ""}, ["train.num_threads=2"]),  # spin 300,000 times, then sleep
    "2-spin-30k": ({"GOMP_SPINCOUNT": "30000"}, ["train.num_threads=2"]),
    "2-spin-3k": ({"GOMP_SPINCOUNT": "3000"}, ["train.num_threads=2"]),
}


def run(config: Path, steps: int, env: dict, overrides: list[str], out: Path) -> tuple[float, str]:
    cmd = [
        str(Path(sys.executable).with_name("dpokit")),
        "train",
        str(config),
        f"train.max_steps={steps}",
        f"out_dir={out}",
        "train.overwrite=true",
        "train.resume=never",
        *overrides,
    ]
    start = time.monotonic()
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    found = re.search(r"CPU threads: (\d+) \(OpenMP waits (\w+)", done.stdout)
    return seconds, f"{found.group(1)} ({found.group(2)})" if found else "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--loads", default="idle,busy")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dpokit-bench"))
    args = parser.parse_args(argv)
    model, data = build_assets("b", Path(args.cache), n_pairs=80)
    work = Path(tempfile.mkdtemp(prefix="dpokit-threads-"))
    config = work / "b.yaml"
    config.write_text(
        f"model: {{name_or_path: {model}}}\ndata: {{path: {data}, max_length: 1024}}\n"
        "train: {batch_size: 4, save_steps: 0, progress_bar: false}\n"
    )
    print("| setting | load | threads used | s/step (20 minus 4 steps) | whole run, 20 steps (s) |")
    print("|---|---|---|---:|---:|")
    for load in args.loads.split(","):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            for name in args.settings.split(","):
                env, overrides = SETTINGS[name]
                t4, _ = run(config, 4, env, overrides, work / "run")
                t20, threads = run(config, 20, env, overrides, work / "run")
                print(f"| {name} | {load} | {threads} | {(t20 - t4) / 16:.2f} | {t20:.1f} |", flush=True)
        finally:
            if spinner:
                spinner.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
