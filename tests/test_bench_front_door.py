"""bench/front_door.py's pure helpers: a step's seconds from metrics.jsonl, the pairs' order through `dpokit train`'s
shuffle, and the threads label (bench/dpo_vs_trl.py times `dpokit train` with them; the runs themselves are not tests);
and bench/dpo_vs_trl.py's median of repeated runs and its table."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from dpokit.data.batching import BatchStream
from dpokit.training.throughput import ModelShape, Throughput

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import dpo_vs_trl  # noqa: E402 (bench/ is on sys.path now)
import front_door  # noqa: E402


def test_step_seconds_are_the_window_tokens_over_tokens_per_second():
    records = [
        {"step": 1, "num_tokens": 100, "tokens_per_second": 50.0},
        {"step": 2, "eval_loss": 0.5},
        {"step": 2, "num_tokens": 250, "tokens_per_second": 300.0},
    ]
    assert front_door.step_seconds(records) == [2.0, 0.5]


def test_step_seconds_give_back_the_throughput_window_clock():
    """What `dpokit train` logs: a window of known clock time over two rows of known lengths (5 and 3 real tokens)."""
    now = [10.0]
    throughput = Throughput(clock=lambda: now[0], shape=ModelShape(params=1000), peak=(1e9, "test"))
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
    }
    throughput.add_step([batch], [False], live_reference=False)
    now[0] = 12.5
    record = throughput.record(SimpleNamespace(num_processes=1, device="cpu"), model=None)
    assert front_door.step_seconds([{"num_tokens": 8, **record}]) == [2.5]


def test_cpu_and_wall_per_step_run_from_the_last_warmup_record_to_the_last():
    seen = [(1.0, 2.0), (3.0, 5.0), (4.0, 7.0), (6.0, 9.0)]  # (wall clock, CPU seconds) at steps 1-4
    assert front_door.per_step_between(seen, warmup=1, steps=3) == (7.0 / 3, 5.0 / 3)
    assert front_door.per_step_between(seen, warmup=0, steps=4) == (None, None)  # nothing marks step 1's start
    assert front_door.per_step_between(seen[:3], warmup=1, steps=3) == (None, None)  # a record was missed
    assert front_door.per_step_between([(1.0, None), (2.0, 3.0)], warmup=1, steps=1) == (None, None)  # /proc unreadable


def test_file_order_makes_the_seeded_stream_train_the_rows_in_their_given_order():
    rows = [f"pair {k}" for k in range(10)]
    written = front_door.file_order(rows, batch_size=4, seed=42)
    assert sorted(written) == sorted(rows) and written != rows  # the same pairs, shuffled on disk
    stream = BatchStream(len(written), 4, 42)
    trained = [written[i] for _ in range(stream.per_epoch) for i in stream.next()[2]]
    assert trained == rows
    assert front_door.in_stream_order(written, batch_size=4, seed=42) == rows


def test_threads_label_prefers_the_runs_own_line():
    console = (
        "[dpokit] CPU threads: 2 (OpenMP waits passive; train.num_threads sets them)\n"
        'BENCH_THREADS {"torch_threads": 2, "passive_wait": true, "OMP_WAIT_POLICY": "PASSIVE"}\n'
    )
    done = front_door.Finished(0, console, 1.0, 100.0, 1.0)
    assert done.threads["torch_threads"] == 2 and front_door.threads_label(done.threads) == "2 (passive)"
    precompute = front_door.Finished(0, 'BENCH_THREADS {"torch_threads": 1, "passive_wait": false}\n', 1.0, 100.0, 1.0)
    assert front_door.threads_label(precompute.threads) == "1 (active)"
    assert front_door.threads_label({}) == "?"


def _run(variant: str, pairs_per_s: float, **more) -> dict:
    return {
        "workload": "a",
        "variant": variant,
        "threads": "2 (passive)",
        "pairs_per_s": pairs_per_s,
        "tokens_per_s": 100 * pairs_per_s,
        "cpu_step_s": 8 / pairs_per_s,
        "peak_rss_mib": 1000.0,
        "loss_step1": 0.693147,
        "loss_step2": 0.69,
        "flops_per_s": 1.0,
        "executed_flops_per_s": 1.0,
        "matmul_peak": 2.0,
        "load_before": 1.0,
        "load_end": 2.0,
        **more,
    }


def test_the_table_has_each_variants_median_run_and_every_runs_pairs_per_second():
    runs = [
        _run("trl", 1.0),
        _run("dpokit", 5.0),
        _run("trl", 3.0),
        _run("dpokit", 4.0),
        _run("trl", 2.0),
        _run("dpokit", 9.0),
    ]
    medians = dpo_vs_trl.median_runs(runs)
    assert [(r["variant"], r["pairs_per_s"], r["pairs_per_s_runs"]) for r in medians] == [
        ("trl", 2.0, [1.0, 2.0, 3.0]),
        ("dpokit", 5.0, [4.0, 5.0, 9.0]),
    ]
    assert dpo_vs_trl.median_runs(runs[:4])[0]["pairs_per_s"] == 1.0  # an even count: the lower middle run
    table = dpo_vs_trl.format_table(medians).splitlines()
    assert len({line.count("|") for line in table}) == 1  # every row has the header's columns
    assert "| a | dpokit | 2 (passive) | 5.00 | 4.00, 5.00, 9.00 | 500 | 2.50x |" in table[3]
    single = dpo_vs_trl.format_table(
        dpo_vs_trl.median_runs([_run("trl", 2.0), {**_run("precompute", 4.0), "cpu_step_s": None}])
    )
    assert "each run" not in single and len({line.count("|") for line in single.splitlines()}) == 1
