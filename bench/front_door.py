"""`dpokit train` and `dpokit precompute` timed through their front door, for bench/dpo_vs_trl.py's children.

    finished = launch("train", config_yaml, console_log, metrics=out_dir / "metrics.jsonl")
    seconds = step_seconds(read_metrics(out_dir / "metrics.jsonl"))   # per optimizer step, from the run's own log

The run is a fresh `python -c LAUNCHER VERB CONFIG` process: it imports dpokit first, as the `dpokit` command
does (dpokit/openmp.py sets OpenMP's passive wait before torch loads OpenMP), then `dpokit.cli.main([VERB,
CONFIG])`. The one thing it adds: the bench's word-level tokenizer is loaded as the plain fast tokenizer it is
(dpo_vs_trl.plain_tokenizer_loading, as on TRL's side; transformers 5 rebuilds a `qwen2` folder's tokenizer as
Qwen2Tokenizer, which tokenises every word of it to nothing; for the Llama workloads it loads the same class).
After the verb returns it prints the threads the run left torch with and OpenMP's wait policy (BENCH_THREADS).

What comes back (Finished): the exit status, the console, the process's peak RSS and CPU seconds from wait4's
rusage, its whole wall time, and, while it ran, the wall clock and the process's CPU seconds (/proc/PID/stat,
all its threads) at the moment each new metrics.jsonl record appeared (polled every 10 ms).

Step time from metrics.jsonl (training/throughput.py): each record has the cumulative `num_tokens` (pair_tokens:
2 x prompt + chosen + rejected per pair) and the window's `tokens_per_second` = the window's tokens / its seconds,
the same token count; with a record every step, (num_tokens - previous num_tokens) / tokens_per_second is the
window's clock time: from the step's first forward (Throughput.add_step in accumulate_gradients) to its record
(log_window, after clipping, AdamW, the schedule and the metric reduction). Collating the step's micro-batch
before it and writing the record after it fall outside the window; the record-to-record times polled here
include them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent

LAUNCHER = f"""\
import sys
import dpokit  # first, as the `dpokit` command imports it: OpenMP's wait policy is chosen before torch loads OpenMP
sys.path.insert(0, {str(BENCH)!r})
from dpo_vs_trl import plain_tokenizer_loading
plain_tokenizer_loading()
from dpokit.cli import main
status = main(sys.argv[1:])
import json, torch
from dpokit import openmp
print("BENCH_THREADS " + json.dumps({{"torch_threads": torch.get_num_threads(), "passive_wait": openmp.PASSIVE_WAIT,
                                     "OMP_WAIT_POLICY": __import__("os").environ.get("OMP_WAIT_POLICY")}}), flush=True)
sys.exit(status)
"""

THREADS_LINE = re.compile(r"CPU threads: (\d+) \(OpenMP waits (\w+)")


@dataclass
class Finished:
    """One front-door process: what wait4 and the polling saw."""

    status: int
    console: str
    wall_s: float  # the whole process, start to exit
    peak_rss_mib: float  # ru_maxrss of the process (wait4)
    cpu_s: float  # user + system seconds of the process, all threads (wait4)
    seen: list = field(default_factory=list)  # per metrics record, in order: (wall clock, the process's CPU seconds)

    @property
    def threads(self) -> dict:
        """torch's threads after the verb and OpenMP's wait policy (BENCH_THREADS), with the run's own console line."""
        found = [line for line in self.console.splitlines() if line.startswith("BENCH_THREADS ")]
        out = json.loads(found[-1].split(" ", 1)[1]) if found else {}
        said = THREADS_LINE.search(self.console)
        if said:
            out["said"] = f"{said.group(1)} ({said.group(2)})"
        return out


def threads_label(threads: dict) -> str:
    """'2 (passive)': torch's threads and OpenMP's wait policy, as `dpokit train` says them (the console line if there is one)."""
    if threads.get("said"):
        return threads["said"]
    if "torch_threads" not in threads:
        return "?"
    return f"{threads['torch_threads']} ({'passive' if threads.get('passive_wait') else 'active'})"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads (/proc/PID/stat fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _new_records(path: Path, seen: int) -> int:
    """How many complete lines with a step record metrics.jsonl holds beyond the first `seen`."""
    try:
        lines = path.read_text().split("\n")[:-1]  # the last piece is unfinished (or empty)
    except OSError:
        return 0
    return max(0, sum('"tokens_per_second"' in line for line in lines) - seen)


def launch(
    verb: str, config: Path, log: Path, env: dict | None = None, metrics: Path | None = None, poll_s: float = 0.01
) -> Finished:
    """Run `dpokit VERB CONFIG` through LAUNCHER in a fresh process; console to `log`; metrics.jsonl watched if given."""
    seen = []
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, verb, str(config)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            new = _new_records(metrics, len(seen)) if metrics is not None else 0
            if new:
                seen += [(time.perf_counter(), _cpu_seconds(proc.pid))] * new
            time.sleep(poll_s)
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here (wait4), so Popen must not wait for it
    return Finished(
        proc.returncode, Path(log).read_text(), wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, seen
    )


def step_seconds(records: list[dict]) -> list[float]:
    """Seconds of each optimizer step from metrics.jsonl records logged every step (see the module docstring)."""
    steps = [r for r in records if "tokens_per_second" in r]
    out, before = [], 0
    for r in steps:
        out.append((r["num_tokens"] - before) / r["tokens_per_second"])
        before = r["num_tokens"]
    return out


def per_step_between(seen: list, warmup: int, steps: int) -> tuple[float | None, float | None]:
    """(CPU seconds, wall seconds) per step over the measured steps, from the (wall clock, CPU seconds) seen as each
    step's record appeared: from the last warm-up step's record to the last step's. (None, None) without a warm-up
    step (nothing marks the first step's start) or a reading."""
    if warmup < 1 or len(seen) != warmup + steps or None in (seen[warmup - 1][1], seen[-1][1]):
        return None, None
    (wall0, cpu0), (wall1, cpu1) = seen[warmup - 1], seen[-1]
    return (cpu1 - cpu0) / steps, (wall1 - wall0) / steps


def stream_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The example indices of one epoch in the order `dpokit train` trains them (data/batching.BatchStream, one process)."""
    from dpokit.data.batching import BatchStream

    stream = BatchStream(n, batch_size, seed)
    order = []
    for _ in range(stream.per_epoch):
        order += stream.next()[2]
    return order


def file_order(rows: list, batch_size: int, seed: int) -> list:
    """`rows` laid out so that `dpokit train` (which shuffles with train.seed) trains them in their given order:
    row k goes to the position the stream visits k-th."""
    out = [None] * len(rows)
    for k, i in enumerate(stream_order(len(rows), batch_size, seed)):
        out[i] = rows[k]
    return out


def in_stream_order(examples: list, batch_size: int, seed: int) -> list:
    """The examples read from a file_order'ed file, back in the order the stream trains them (the given order)."""
    return [examples[i] for i in stream_order(len(examples), batch_size, seed)]
