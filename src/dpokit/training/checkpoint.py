"""Checkpoints: write one atomically, find them, keep the last few (restore.py reads one back exactly).

    out_dir/checkpoints/checkpoint-<step>/
        model.safetensors (+ config.json)     full fine-tuning: every policy weight (loads with from_pretrained)
        adapter_model.safetensors (+ config)  LoRA: the adapter only; the base is re-read from model.name_or_path
        optimizer.safetensors, optimizer.json AdamW moments (tensors) and param groups
        scheduler.json, rng_state.json        schedule position; python/numpy/torch RNG states of every process
        trainer_state.json                    step, data position, counters, unlogged metric sums, config
        reference.safetensors                 the reference, once it has moved (loss.ref_sync_steps, TR-DPO)
        manifest.json                         size and blake2b of every other file (written last; manifest.py)

No pickle anywhere (under FSDP/DeepSpeed the sharded model and optimizer go through
Accelerate's `save_state` into `accelerate/`, which pickles its optimizer shards). A
checkpoint is written into `.tmp-checkpoint-<step>`, flushed to disk, then renamed:
a crash mid-write leaves only a temporary folder, which is never resumed from and is
removed at the next start (resume.py), which also checks the manifest before resuming.
Only the main process writes (except sharded backends, whose every process writes its own
shard). A checkpoint needs its whole size free (old ones are rotated out only after it is
complete): with too little space, up front or while writing, the run stops with one line and
nothing of the new checkpoint is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from safetensors import SafetensorError
from safetensors.torch import save_file, save_model

from dpokit.config import ConfigError
from dpokit.inputs import read_json as read_input_json
from dpokit.training.disk_space import DISK_FULL, disk_full_code, filled_up, no_space
from dpokit.training.fsdp import is_fsdp, save_sharded
from dpokit.training.manifest import MANIFEST, write_manifest
from dpokit.training.metrics import MetricSums
from dpokit.training.rng import rng_state

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
REFERENCE_FILE = "reference.safetensors"


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed from; the message says which and why (the CLI exits 2)."""


@dataclass
class RunState:
    """Everything besides weights, optimizer, schedule and RNG that an exact resume needs."""

    step: int = 0  # optimizer steps done (skipped ones included)
    micro_seen: int = 0  # global micro-batches consumed: the data position
    skipped_steps: int = 0  # non-finite loss/gradient: update skipped
    overflow_steps: int = 0  # fp16 loss-scaler overflows (the scaler skips and lowers its scale)
    tokens_seen: int = 0  # input tokens of the global micro-batches consumed (the logged num_tokens)
    total_steps: int = 0
    finished: bool = False
    stop_reason: Optional[str] = None
    window: dict = field(default_factory=lambda: {"sums": {}, "counts": {}})  # metric sums since the last log
    structure: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    world_size: int = 1
    ref_syncs: int = 0  # TR-DPO syncs done (loss.ref_sync_steps): > 0 means the checkpoint carries the moved reference
    beta_threshold: float = 0.0  # beta-DPO's moving average M_0 of the batch margins (loss.beta_schedule=adaptive)


# --- finding checkpoints -----------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary and half-deleted folders never match)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def read_state(path: Path) -> RunState:
    try:
        raw = read_json(Path(path) / STATE_FILE)
        return RunState(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a complete dpokit checkpoint ({type(e).__name__}: {e})") from None


def read_json(path: Path):
    """A checkpoint's JSON file, through the input gateway (a regular file within the run-file limit: a FIFO or a
    device put in its place is refused at once, never read until memory runs out)."""
    return read_input_json(path, "run", "checkpoint file")


def remove_atomically(path: Path) -> None:
    """Delete a folder (a checkpoint, a final model) so that a crash never leaves half of it under its real name."""
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}") if not path.name.startswith(".") else path
    os.replace(path, doomed)  # atomic: a crash mid-delete never leaves a half checkpoint under its real name
    shutil.rmtree(doomed, ignore_errors=True)


# --- saving ------------------------------------------------------------------------------------


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_checkpoint(
    accelerator,
    run_dir: Path,
    state: RunState,
    policy,
    optimizer,
    scheduler,
    window: MetricSums,
    keep: int,
    reference=None,
) -> Path:
    """Write checkpoint-<state.step> atomically; call on every process. Returns its path. `reference`: a moved one (TR-DPO).

    Too little free space for it, up front or while writing (ENOSPC), raises CheckpointError on
    every process with one line: nothing of it is left behind and the previous checkpoints are untouched.
    """
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"checkpoint-{state.step}", root / f".tmp-checkpoint-{state.step}"
    is_main = accelerator.is_main_process
    rng = _gathered(accelerator, rng_state())
    state.window = _sum_windows(_gathered(accelerator, {"sums": window.sums, "counts": window.counts}))
    state.world_size = accelerator.num_processes
    if final.is_dir() and (final / STATE_FILE).is_file():  # same step saved before (resumed at it): identical
        accelerator.wait_for_everyone()
        return final
    needed, free = _ensure_space(accelerator, run_dir, final, policy, optimizer, reference)
    problem = None
    try:
        _write_shards(accelerator, tmp, policy, optimizer)
    except (OSError, SafetensorError) as e:
        problem = _disk_full(e, run_dir, final, needed, free)
    if accelerator.num_processes > 1:  # also the barrier after the sharded save
        problem = next((p for p in gather_object([problem]) if p), None)
    if is_main and not problem:
        try:
            _write_files(accelerator, tmp, policy, optimizer, scheduler, reference, rng, state)
            _publish(tmp, final)
        except (OSError, SafetensorError) as e:
            problem = _disk_full(e, run_dir, final, needed, free)
    problem = _from_main(accelerator, problem)
    if problem:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problem)
    if is_main:
        _rotate(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _ensure_space(accelerator, run_dir: Path, final: Path, policy, optimizer, reference) -> tuple[int, int]:
    """(bytes the checkpoint needs, bytes free); CheckpointError on every process, before anything is written, when
    they do not fit."""
    needed, free = checkpoint_bytes(accelerator, run_dir, policy, optimizer), shutil.disk_usage(run_dir).free
    needed += _tensor_bytes(list(reference.state_dict().values())) if reference is not None else 0
    # The rotation deletes old checkpoints only after the new one is complete, so it needs its whole size free.
    problem = _from_main(
        accelerator, _no_space(run_dir, final, needed, free, "nothing was written") if free < needed else None
    )
    if problem:
        raise CheckpointError(problem)
    return needed, free


def _write_shards(accelerator, tmp: Path, policy, optimizer) -> None:
    """The fresh temporary folder (main process); under FSDP/DeepSpeed or train.fsdp, every process's shards into it."""
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if is_sharded(accelerator):
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))  # sharded weights and optimizer, every process
    elif is_fsdp(policy):  # train.fsdp: every process writes its shards into dcp/ (torch.distributed.checkpoint)
        accelerator.wait_for_everyone()
        save_sharded(tmp, policy, optimizer)


def _write_files(accelerator, tmp: Path, policy, optimizer, scheduler, reference, rng: list, state: RunState) -> None:
    """The main process's files: the weights and optimizer (unless sharded), the schedule, a moved reference, every
    process's RNG state, and trainer_state.json last, whose presence marks a complete folder."""
    if not is_sharded(accelerator) and not is_fsdp(policy):
        _write_weights(accelerator.unwrap_model(policy), tmp)
        _write_optimizer(optimizer.state_dict(), tmp)
    if not is_sharded(accelerator):
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
    if reference is not None:
        save_model(reference, str(tmp / REFERENCE_FILE))  # tied weights once, no pickle
    _write_json(tmp / "rng_state.json", rng)
    _write_json(tmp / STATE_FILE, asdict(state))  # its presence marks a complete folder


def _publish(tmp: Path, final: Path) -> None:
    """Flushed to disk, checksummed (manifest.json), then renamed to its real name in one step."""
    fsync_tree(tmp)
    write_manifest(tmp)  # last: the checksums of the files just written, read back from the page cache
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


# --- disk space --------------------------------------------------------------------------------

_SMALL_FILES = 1 << 20  # config.json, scheduler, trainer state, manifest; plus rng_state.json's ~30 KB per process


def checkpoint_bytes(accelerator, run_dir: Path, policy, optimizer) -> int:
    """About what one checkpoint takes on disk: weights (the adapter under LoRA) + optimizer state + small files.

    Under FSDP/DeepSpeed the parameters a process sees are shards (or empty), so the size of the latest
    checkpoint stands in (none yet: 0, and only a full disk while writing is caught).
    """
    if is_sharded(accelerator) or is_fsdp(policy):
        previous = list_checkpoints(run_dir)
        return sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file()) if previous else 0
    model = accelerator.unwrap_model(policy)
    if hasattr(model, "peft_config"):  # a PeftModel saves its adapter only
        weights = [p for p in model.parameters() if p.requires_grad]
    else:
        weights = list(model.state_dict().values())
    moments = [v for values in optimizer.state_dict()["state"].values() for v in values.values() if torch.is_tensor(v)]
    return _tensor_bytes(weights) + _tensor_bytes(moments) + _SMALL_FILES + (64 << 10) * accelerator.num_processes


def _tensor_bytes(tensors: list) -> int:
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())  # tied weights are saved once


def _disk_full(error: Exception, run_dir: Path, final: Path, needed: int, free: int) -> str:
    """The one-line message for a disk that filled up while writing; any other error goes on up."""
    code = disk_full_code(error)
    if code is None:
        raise error
    return _no_space(run_dir, final, needed, free, filled_up(code))


def _no_space(run_dir: Path, final: Path, needed: int, free: int, what_happened: str) -> str:
    previous = list_checkpoints(run_dir)
    kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "there is no earlier checkpoint"
    return no_space(
        final,
        needed,
        free,
        what_happened,
        kept,
        "Free some space (or lower train.save_total_limit), then resume with train.resume=auto",
    )


def _from_main(accelerator, value):
    """The main process's value, on every process."""
    return broadcast_object_list([value])[0] if accelerator.num_processes > 1 else value


def _gathered(accelerator, value) -> list:
    """Every process's value, in process order, on every process."""
    return gather_object([value]) if accelerator.num_processes > 1 else [value]


def _sum_windows(windows: list[dict]) -> dict:
    # Metric sums add up across processes, so one merged window restores on any number of them.
    sums, counts = {}, {}
    for w in windows:
        for name, value in w["sums"].items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0.0) + w["counts"][name]
    return {"sums": sums, "counts": counts}


def _write_weights(model, folder: Path) -> None:
    # Full model: HF format (model.safetensors + config.json); PeftModel: the adapter only.
    model.save_pretrained(folder, safe_serialization=True)


def _write_optimizer(state_dict: dict, folder: Path) -> None:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json(folder / "optimizer.json", {"param_groups": state_dict["param_groups"], "scalars": scalars})


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno in DISK_FULL:  # the data did not reach the disk
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(folder)


def _rotate(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        remove_atomically(path)
