"""A damaged reference cache is detected, moved aside and rebuilt (issue 15.1), and the cache build is shared by processes (11.5).

Before: flipping one bit per cached float gave a step-1 loss of 1.311 and a margin of 18.3 (a policy
equal to its reference must give log 2 and 0), and a truncated file stopped every run with a
traceback. Now each file's values carry a blake2b checksum (store.values_checksum).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpokit
from dpokit.config import load_config
from dpokit.data.prepare import prepare_data
from dpokit.models import load_tokenizer
from dpokit.ref_cache.build import ensure_reference_cache
from dpokit.ref_cache.store import CacheCorrupt, read_split
from dpokit.training.metrics import read_metrics
from tiny_assets import synthetic_pairs, tiny_model_dir, torchrun, write_jsonl

TESTS = Path(__file__).resolve().parent


def _cfg(tmp_path, cache="cache", **extra) -> dict:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, synthetic_pairs(13, seed=3))
    cfg = {
        "model.name_or_path": str(tiny_model_dir()),
        "data.path": str(data),
        "data.max_length": 32,
        "data.max_prompt_length": 16,
        "data.eval_fraction": 0.25,
        "loss.beta": 0.5,
        "train.batch_size": 2,
        "train.max_steps": 1,
        "train.logging_steps": 1,
        "train.save_steps": 0,
        "train.progress_bar": False,
        "speed.ref_cache_dir": str(tmp_path / cache),
        "out_dir": str(tmp_path / "run"),
    }
    cfg.update(extra)
    return cfg


def _build(tmp_path, **extra):
    cfg = load_config(None, _cfg(tmp_path, **extra))
    tokenizer = load_tokenizer(cfg)
    cache, _ = ensure_reference_cache(cfg, tokenizer, prepare_data(cfg, tokenizer))
    return cfg, cache


def _flip_one_bit_per_float(path: Path) -> None:
    """Bit 30 (the exponent's top bit) of every float32 in the logps tensor, in place in the file."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])["logps"]["data_offsets"]
    body = 8 + n
    for i in range(body + start, body + end, 4):
        raw[i + 3] ^= 0x40
    path.write_bytes(bytes(raw))


def _step1(tmp_path, cfg: dict) -> dict:
    dpokit.train(load_config(None, cfg))
    return next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r)


def test_flipped_bits_are_detected_the_cache_moved_aside_rebuilt_and_step_1_loss_is_log_2(tmp_path):
    cfg, cache = _build(tmp_path)
    _flip_one_bit_per_float(cache.folder / "train.safetensors")
    with pytest.raises(CacheCorrupt, match="checksum"):
        read_split(cache.folder, "train", cache.digest)
    with pytest.warns(RuntimeWarning, match="reference cache damaged.*rebuilding"):
        record = _step1(tmp_path, _cfg(tmp_path))
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-5) and record["rewards/margins"] == pytest.approx(
        0, abs=1e-5
    )
    aside = [p.name for p in cache.folder.parent.iterdir() if p.name.startswith(cache.folder.name + ".corrupt-")]
    assert len(aside) == 1  # kept for inspection, never read again
    assert read_split(cache.folder, "train", cache.digest) is not None  # rebuilt in the original folder


def test_a_truncated_cache_file_is_rebuilt_without_a_traceback(tmp_path):
    cfg, cache = _build(tmp_path)
    path = cache.folder / "eval.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        record = _step1(tmp_path, _cfg(tmp_path))
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert read_split(cache.folder, "eval", cache.digest) is not None


_SHARDED = """
import json, sys
sys.path.insert(0, {tests!r})
from accelerate import Accelerator
from dpokit.config import load_config
from dpokit.data.prepare import prepare_data
from dpokit.models import load_policy, load_tokenizer
from dpokit.ref_cache.build import ensure_reference_cache
cfg = load_config(None, json.loads(sys.argv[1]))
accelerator = Accelerator(cpu=True)
tokenizer = load_tokenizer(cfg)
batches = []
import dpokit.ref_cache.build as build
original = build.reference_sequence_logps
def counting(*args):
    batches.append(1)
    return original(*args)
build.reference_sequence_logps = counting
cache, data = ensure_reference_cache(cfg, tokenizer, prepare_data(cfg, tokenizer), model=load_policy(cfg), accelerator=accelerator)
assert all(p.reference is not None for p in data.train + data.eval)
with open(sys.argv[2] + f"/rank{{accelerator.process_index}}.txt", "w") as out:  # a file per rank: the shared stdout pipe lost lines
    out.write(f"RANK {{accelerator.process_index}} {{cache.built}} {{len(batches)}} {{cache.folder}}")
"""


@pytest.mark.slow
def test_two_processes_share_the_build_and_write_the_bytes_one_process_writes(tmp_path):
    cfg1, one = _build(tmp_path, **{"train.batch_size": 1})  # batch 1: 9 train batches, so both ranks score some
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED.format(tests=str(TESTS)))
    run = torchrun(str(script), json.dumps(_cfg(tmp_path, cache="cache2", **{"train.batch_size": 1})), str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = sorted((tmp_path / f"rank{i}.txt").read_text() for i in range(2) if (tmp_path / f"rank{i}.txt").exists())
    assert [line.split()[1:3] for line in lines] == [["0", "True"], ["1", "True"]]
    scored = [int(line.split()[3]) for line in lines]
    assert min(scored) > 0 and sum(scored) == 9 + 4  # every batch once (9 train + 4 eval pairs, batch 1), on both ranks
    two = Path(lines[0].split()[4])
    assert two.name == one.folder.name  # same fingerprint
    for split in ("train", "eval"):
        a, b = load_file(one.folder / f"{split}.safetensors"), load_file(two / f"{split}.safetensors")
        assert a["logps"].numpy().tobytes() == b["logps"].numpy().tobytes()
        assert torch.equal(a["pair_hash"], b["pair_hash"])
