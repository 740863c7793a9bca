"""The measured blocks of docs/ that bench/refresh_docs.py reruns: the commands behind each, and how its text is made.

A `Run` is a few shell lines run from the repository root (with the virtualenv's `dpokit` and
`python` first on PATH), shown in the block exactly as run; a block reads the files its runs
wrote under runs/refresh_docs/. Each run happens once per refresh, however many blocks read it.
Only commands that take a few minutes at most on a 2-core CPU belong here.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WORK = "runs/refresh_docs"
FRESH_CACHE = f"export DPOKIT_CACHE={WORK}/cache   # new and empty: the demo's SFT model is built as on a fresh install"
RETENTION = "data.retention_path=demo:sentiment-sft-text"  # the demo's retention set (docs/evaluation.md)
AGGRESSIVE = f"{RETENTION} loss.beta=0.1 optim.lr=5e-4 train.max_steps=120"  # docs/demo.md's first config
OPENINGS = (
    'python -c "import json; from dpokit.demo import world; '
    "print('\\n'.join(json.dumps({'prompt': p}) for p in world.eval_prompts(32)))\" > " + f"{WORK}/openings.jsonl"
)


@dataclass(frozen=True)
class Run:
    """Shell lines run together from the repository root; `needs`: the runs whose outputs they read."""

    lines: tuple[str, ...]
    needs: tuple[str, ...] = ()

    def script(self, reuse_cache: bool) -> list[str]:
        return list(self.lines) if reuse_cache else [FRESH_CACHE, *self.lines]


RUNS = {
    "demo": Run((f"dpokit demo --out-dir {WORK}/demo",)),
    "shipped": Run((f"dpokit train demo {RETENTION} out_dir={WORK}/shipped",)),
    "aggressive": Run((f"dpokit train demo {AGGRESSIVE} out_dir={WORK}/aggressive",)),
    "mix": Run((f"dpokit train demo {AGGRESSIVE} data.sft_mix_path=demo:sentiment-sft-mix out_dir={WORK}/mix",)),
    "mix02": Run(
        (
            f"dpokit train demo {AGGRESSIVE} data.sft_mix_path=demo:sentiment-sft-mix loss.sft_mix_weight=0.2 "
            f"out_dir={WORK}/mix02",
        )
    ),
    "split": Run(
        (
            f"python bench/retention_split.py --policy {WORK}/shipped/final --corpus-mix > {WORK}/split-corpus-mix.txt",
            f"python bench/retention_split.py --policy {WORK}/shipped/final > {WORK}/split-shipped.txt",
        ),
        needs=("shipped",),
    ),
    "eval": Run(
        (
            OPENINGS,
            f"dpokit eval --policy {WORK}/demo/final --reference demo:sentiment-sft "
            f"--prompts {WORK}/openings.jsonl --scorer dpokit.demo.world:sentiment "
            f"--suite ifeval --suite lc_winrate --suite length_stats --out {WORK}/demo/eval.json",
        ),
        needs=("demo",),
    ),
}


@dataclass
class Done:
    log: str  # stdout and stderr together
    seconds: float
    load: float  # 1-minute load average when it started


class Runner:
    """Runs each `Run` once, its `needs` first, in runs/refresh_docs/ (emptied when the runner starts)."""

    def __init__(self, root: Path, reuse_cache: bool = False) -> None:
        self.root, self.reuse_cache, self.done = root, reuse_cache, {}
        self.work = root / WORK
        if self.work.exists():
            if not (self.work / ".refresh_docs").exists():
                raise SystemExit(f"{self.work} exists and was not made by bench/refresh_docs.py; move it away first")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        (self.work / ".refresh_docs").write_text("made by bench/refresh_docs.py; emptied at each refresh\n")

    def run(self, name: str) -> Done:
        if name in self.done:
            return self.done[name]
        for need in RUNS[name].needs:
            self.run(need)
        script = "\n".join(["set -eo pipefail", *RUNS[name].script(self.reuse_cache)])
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        print(f"[refresh_docs] running {name} ...", flush=True)
        load, started = os.getloadavg()[0], time.time()
        proc = subprocess.run(
            ["bash", "-c", script], cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        (self.work / f"{name}.log").write_text(proc.stdout)
        if proc.returncode != 0:
            tail = proc.stdout[-3000:]
            raise SystemExit(f"[refresh_docs] {name} failed (exit {proc.returncode}); its output ends:\n{tail}")
        self.done[name] = Done(proc.stdout, time.time() - started, load)
        return self.done[name]


def commands(runs: tuple[str, ...], reuse_cache: bool) -> list[str]:
    """The shell lines of `runs` and of the runs they need, in the order they run, each once."""
    lines: list[str] = []
    for name in runs:
        for need in (*RUNS[name].needs, name):
            lines += [line for line in RUNS[need].script(reuse_cache) if line not in lines]
    return lines


def machine() -> str:
    import torch

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "CPU",
        )
        if Path("/proc/cpuinfo").exists()
        else "CPU"
    )
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores{gpu}), torch {torch.__version__}"


@dataclass(frozen=True)
class BlockSpec:
    """A marked block: its page (under docs/), the runs it reads, the measured text, and --check's tolerance."""

    name: str
    page: str
    runs: tuple[str, ...]
    measured: Callable[[Runner], str]
    rel_tol: float = 0.05
    abs_tol: float = 0.02

    def render(self, runner: Runner) -> str:
        for name in self.runs:
            runner.run(name)
        walls = ", ".join(
            _wall(name, runner.done[name])
            for name in runner.done
            if name in self.runs or any(name in RUNS[r].needs for r in self.runs)
        )
        today = datetime.date.today().isoformat()
        header = (
            f"Measured by `python bench/refresh_docs.py --only {self.name}` on {today}, {machine()}; "
            f"wall time {walls}. From the repository root:"
        )
        script = "\n".join(commands(self.runs, runner.reuse_cache))
        return f"{header}\n\n```bash\n{script}\n```\n\n{self.measured(runner)}\n"


def _wall(name: str, done: Done) -> str:
    build = re.search(r"\[demo\] ready in ([\d.]+)s", done.log)  # the demo's SFT model and data, built or read
    of_which = f", of which {float(build.group(1)):.0f} s building the SFT model and data" if build else ""
    return f"{name} {done.seconds:.0f} s{of_which} (load average {done.load:.1f} at its start)"


# --- the measured text of each block ------------------------------------------------------------


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def demo_table(runner: Runner) -> str:
    from dpokit.online.demo_eval import format_table

    report = json.loads((runner.work / "demo" / "demo_report.json").read_text())
    return "```\n" + format_table(report["before"], report["after"]) + "\n```"


RETENTION_ROWS = (
    ("shipped", "shipped demo config (beta 0.5, lr 1e-4, 100 steps)"),
    ("aggressive", "aggressive (beta 0.1, lr 5e-4, 120 steps)"),
    ("mix", "aggressive + SFT mixing, `loss.sft_mix_weight=1.0` (default)"),
    ("mix02", "aggressive + SFT mixing, `loss.sft_mix_weight=0.2`"),
)


def retention_table(runner: Runner) -> str:
    from dpokit.config import DetectorsConfig

    lines = [
        "| run | `retention/nll_delta` at step 25 / 50 / 100 / end | `forgetting` | eval accuracy (end) | "
        "`eval_kl/chosen` (end) |",
        "|---|---|---|---|---|",
    ]
    refs = set()
    for name, label in RETENTION_ROWS:
        records = _records(runner.work / name)
        delta = {r["step"]: r["retention/nll_delta"] for r in records if "retention/nll_delta" in r}
        refs |= {round(r["retention/nll_ref"], 3) for r in records if "retention/nll_ref" in r}
        deltas = " / ".join(f"{delta[s]:.3f}" if s in delta else "-" for s in (25, 50, 100, max(delta)))
        fired = re.search(
            r"warn: forgetting at step (\d+): retention/nll_delta=([\d.]+) .*?above ([\d.]+)", runner.done[name].log
        )
        fired_text = f"yes, at step {fired.group(1)} ({fired.group(2)} > {fired.group(3)})" if fired else "no"
        accuracy = [r["eval_rewards/accuracies"] for r in records if "eval_rewards/accuracies" in r][-1]
        kl = [r["eval_kl/chosen"] for r in records if "eval_kl/chosen" in r][-1]
        lines.append(f"| {label} | {deltas} | {fired_text} | {100 * accuracy:.1f}% | {kl:.2f} |")
    d = DetectorsConfig()
    ref = sorted(refs)[0] if len(refs) == 1 else None
    mix = [r["sft_mix/nll"] for r in _records(runner.work / "mix") if "sft_mix/nll" in r]
    limit = (
        f"the reference's retention NLL is {ref:.3f} nats per token in each run, so the limit is max("
        f"{d.forgetting_nll_delta:g}, {d.forgetting_nll_delta_fraction:g} x {ref:.3f}) = "
        f"{max(d.forgetting_nll_delta, d.forgetting_nll_delta_fraction * ref):.3f}"
        if ref is not None
        else f"the reference's retention NLL differs between runs: {sorted(refs)}"
    )
    return "\n".join(lines) + (
        f"\n\n({limit}; `sft_mix/nll`, the mixed term before its weight, stays between "
        f"{min(mix):.2f} and {max(mix):.2f} in the weight-1.0 run.)"
    )


def retention_split_tables(runner: Runner) -> str:
    corpus_mix = (runner.work / "split-corpus-mix.txt").read_text().strip()
    shipped = (runner.work / "split-shipped.txt").read_text().strip()
    return (
        f"```text\nThe SFT corpus' own mix (--corpus-mix: 40% positive reviews, the set the demo used to ship):\n"
        f"{corpus_mix}\n\n"
        "The shipped retention set (demo:sentiment-sft-text: the same 200 reviews, drawn positive):\n"
        f"{shipped}\n```"
    )


def diagnoses(runner: Runner, name: str = "aggressive") -> str:
    """The diagnoses a run printed (their evidence, without the advice), then its last evaluation."""
    fired = re.findall(r"^\[dpokit\] (?:warn|stop): .*$", runner.done[name].log, flags=re.M)
    last = [r for r in _records(runner.work / name) if "eval_rewards/accuracies" in r][-1]
    delta = ""
    if "retention/nll_delta" in last:
        delta = f", retention/nll_delta {last['retention/nll_delta']:.3f} nats per token"
    return (
        "```\n" + "\n".join(fired or ["(no diagnosis)"]) + f"\n```\n\nAt the end (step {last['step']}): held-out "
        f"preference accuracy {100 * last['eval_rewards/accuracies']:.1f}%, "
        f"eval_kl/chosen {last['eval_kl/chosen']:.2f} nats per sequence{delta}."
    )


def eval_table(runner: Runner) -> str:
    return (runner.work / "demo" / "eval.md").read_text().strip()


BLOCKS = {
    spec.name: spec
    for spec in (
        BlockSpec("demo", "demo.md", ("demo",), demo_table),
        BlockSpec("demo-aggressive", "demo.md", ("aggressive",), diagnoses),
        BlockSpec("retention", "evaluation.md", ("shipped", "aggressive", "mix", "mix02"), retention_table),
        BlockSpec("retention-split", "evaluation.md", ("split",), retention_split_tables),
        BlockSpec("eval-demo", "evaluation.md", ("eval",), eval_table),
    )
}
