"""Resuming: which checkpoint `train.resume` means, whether it belongs to this run, and restoring it.

structure_of / data_fingerprint  what must not change for a resume to continue the same run
choose_resume                    train.resume (auto, never, a path) -> a checkpoint folder or a fresh start
latest_intact                    the newest checkpoint that passes its manifest; the damaged ones said and moved aside
clear_checkpoints                remove a crash's temporary folders, and a previous run's checkpoints on a fresh start
ContinuedMetricsLog              metrics.jsonl cut back to the checkpoint's step
start_or_resume                  all of it, on every process: (run state, unlogged metric sums, metrics log)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from accelerate.utils import broadcast_object_list

from dpokit.config import PATH_KEYS, Config
from dpokit.training.checkpoint import (
    CHECKPOINTS, STATE_FILE, CheckpointError, RunState, list_checkpoints, read_state, remove_atomically,
)  # fmt: skip
from dpokit.training.manifest import MANIFEST, damage, has_manifest
from dpokit.training.metrics import MetricsLog, MetricSums
from dpokit.training.restore import load_checkpoint

# Settings that fix what a step computes and which examples it sees: resuming across a change in
# one of them would not continue the same run. Anything else (lr, beta, logging...) may change, with a notice.
STRUCTURAL_KEYS = (
    "model.name_or_path", "model.ref_name_or_path", "model.revision", "train.task", "lora.enabled", "lora.r", "lora.target_modules", "data.path", "data.split",
    "data.layout", "data.columns", "data.max_length", "data.max_prompt_length", "data.max_rows", "data.eval_fraction",
    "train.grad_accum", "train.seed", "loss.type",
)  # fmt: skip


def structure_of(cfg: Config, n_train: int, fingerprint: str, world_size: int) -> dict:
    flat = _flat(cfg.to_dict())
    out = {key: flat[key] for key in STRUCTURAL_KEYS}
    out.update(
        {
            "training examples": n_train,
            "training data fingerprint": fingerprint,
            "global batch size (train.batch_size x processes)": cfg.train.batch_size * world_size,
        }
    )
    return out


def data_fingerprint(examples: list) -> str:
    """A cheap hash of the tokenised training data (count and 64 evenly spaced examples)."""
    n = len(examples)
    picks = sorted({int(i * (n - 1) / 63) for i in range(64)}) if n else []
    digest = hashlib.sha256(str(n).encode())
    for i in picks:
        digest.update(repr(examples[i]).encode())
    return digest.hexdigest()[:16]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix == "":
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def choose_resume(cfg: Config, run_dir: Path, structure: dict, total_steps: int) -> Optional[Path]:
    """The checkpoint `train.resume` asks for, or None for a fresh start (main process only)."""
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return _auto_resume(cfg, run_dir, structure, total_steps)
    path = _named_checkpoint(mode, run_dir)
    state = read_state(path)
    return _same_run(cfg, path, state, _structural_changes(state, structure))


def _auto_resume(cfg: Config, run_dir: Path, structure: dict, total_steps: int) -> Optional[Path]:
    """train.resume=auto: the latest intact checkpoint of out_dir; None when there is none, or when it ends a finished
    run (a new run starts), unless final/ is missing, which that checkpoint is then resumed to write."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    path = latest_intact(run_dir, found, own=True)
    state = read_state(path)
    changed = _structural_changes(state, structure)
    if not (state.finished and (changed or total_steps <= state.step)):
        return _same_run(cfg, path, state, changed)
    if final_intact(run_dir):
        print(
            f"[dpokit] {run_dir} holds a finished run ({path.name}); starting a new run "
            f"(train.resume={path} would continue that one)",
            flush=True,
        )
        return None
    # final/ failed to be written (a full disk): this checkpoint is the only copy of the trained weights
    if changed:
        raise CheckpointError(
            f"{run_dir}: its run finished training but final/ is missing or damaged, and {path.name} is "
            "the only copy of its trained weights: rerun it with its own settings to write final/, or "
            "use another out_dir (train.resume=never would delete it)"
        )
    print(
        f"[dpokit] {run_dir}: its run finished training but final/ is missing or damaged: resuming from {path.name} "
        "to write it (no step is trained again)",
        flush=True,
    )
    return path


def _named_checkpoint(mode: str, run_dir: Path) -> Path:
    """train.resume=PATH: that checkpoint folder (refused when damaged), or a run directory's latest intact checkpoint."""
    path = Path(mode).expanduser()
    if not (path / STATE_FILE).is_file() and list_checkpoints(path):  # a run directory: its latest intact checkpoint
        path = latest_intact(path, list_checkpoints(path), own=path.resolve() == Path(run_dir).resolve())
    elif (path / STATE_FILE).is_file():
        problem = damage(path)
        if problem:
            raise CheckpointError(
                f"train.resume={mode!r}: the checkpoint is damaged ({problem}); resume from an "
                "earlier checkpoint of that run, or start over with train.resume=never"
            )
        _say_if_unverified(path)
    if not path.is_dir():
        raise CheckpointError(f"train.resume={mode!r}: no such checkpoint folder")
    return path


def _same_run(cfg: Config, path: Path, state: RunState, changed: list[tuple]) -> Path:
    """`path`, when its run had the same structural settings (else CheckpointError); the other settings that changed
    are said in one line."""
    if changed:
        details = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
        raise CheckpointError(
            f"cannot resume from {path}: it was made by a run with different settings ({details}). Continue it with "
            "the same settings, start over with train.resume=never (this deletes its checkpoints), or use another out_dir"
        )
    now = _flat(cfg.to_dict())
    notes = [
        f"{k}: {a!r} -> {now.get(k)!r}"
        for k, a in _flat(state.config).items()
        if a != now.get(k) and k not in STRUCTURAL_KEYS and k not in ("train.resume", "train.max_steps", "train.epochs")
    ]
    if notes:
        print(f"[dpokit] resuming with changed settings: {'; '.join(notes)}", flush=True)
    return path


def latest_intact(run_dir: Path, found: list[Path], own: bool) -> Path:
    """The newest of a run's checkpoints whose files pass their manifest (`found`: oldest first).

    Each damaged one newer than it gets one line; in this run's own folder it is moved aside to
    .corrupt-checkpoint-<step>-<time> (kept for inspection, never resumed from), so that the resumed
    run writes that step afresh. With none intact the run stops: starting over would throw the work away.
    """
    damaged = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            break
        damaged.append((path, problem))
    else:
        listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise CheckpointError(
            f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS} ({listing}); restore one from a copy, "
            "or start over with train.resume=never (this deletes them)"
        )
    for bad, problem in damaged:
        kept = ""
        if own:
            aside = bad.with_name(f".corrupt-{bad.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(bad, aside)
            kept = f"; the damaged folder is kept as {aside.name} (delete it to reclaim the space)"
        print(f"[dpokit] {bad} is damaged ({problem}); resuming from {path.name} instead{kept}", flush=True)
    _say_if_unverified(path)
    return path


def _say_if_unverified(path: Path) -> None:
    if not has_manifest(path):
        print(
            f"[dpokit] {path} has no {MANIFEST} (written before dpokit checksummed checkpoints): not verified, "
            "only its file sizes and JSON were checked",
            flush=True,
        )


def _structural_changes(state: RunState, structure: dict) -> list[tuple]:
    return [(k, state.structure.get(k), v) for k, v in structure.items() if not _same(k, state.structure.get(k), v)]


def _same(key: str, before, now) -> bool:
    """Equal settings; a path is the same path written relative (a run from before paths were resolved) or absolute."""
    if key in PATH_KEYS and isinstance(before, str) and isinstance(now, str) and before and now:
        return os.path.abspath(os.path.expanduser(before)) == os.path.abspath(os.path.expanduser(now))
    return before == now


def final_intact(run_dir: Path) -> bool:
    """final/ holds a model whose files are whole (safetensors as long as their headers say, JSON that parses)."""
    final = Path(run_dir) / "final"
    return final.is_dir() and any(final.glob("*.safetensors")) and damage(final) is None


def clear_checkpoints(run_dir: Path, keep_checkpoints: bool) -> None:
    """Remove temporary folders left by a crash, and, when starting over, the checkpoints of a previous run."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    old = [] if keep_checkpoints else list_checkpoints(run_dir)
    if old:
        print(f"[dpokit] new run: removing {len(old)} checkpoint(s) of a previous run in {root}", flush=True)
    for path in root.iterdir():
        if path.name.startswith((".tmp-", ".deleting-")) or path in old:
            remove_atomically(path)


class ContinuedMetricsLog(MetricsLog):
    """metrics.jsonl of a resumed run: the records up to the checkpoint's step are kept (atomically), later ones dropped."""

    def __init__(self, path: Path, source: Path, up_to_step: int, enabled: bool = True) -> None:
        self.path, self.enabled, self.kept = path, enabled, []
        if source.is_file():
            for line in source.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the crash
                if isinstance(record, dict) and record.get("step", 0) <= up_to_step:
                    self.kept.append(record)
        if enabled:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.kept))
            os.replace(tmp, path)


def start_or_resume(
    accelerator,
    cfg: Config,
    run_dir: Path,
    train_examples: list,
    total_steps: int,
    policy,
    optimizer,
    scheduler,
    detectors,
    reference=None,
) -> tuple[RunState, MetricSums, MetricsLog]:
    """Resume as train.resume says, or start fresh: (run state, unlogged metric sums, metrics log).

    The main process picks the checkpoint (and tidies out_dir/checkpoints); every process restores
    from it (`reference`, the unwrapped reference model: a moved one is read back). The detectors replay the kept metrics records, minus the non-finite one that stopped a run.
    """
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    structure = structure_of(cfg, len(train_examples), data_fingerprint(train_examples), world)
    choice: list = [None]
    if is_main:
        try:
            choice = [choose_resume(cfg, run_dir, structure, total_steps)]
            own = choice[0] is not None and choice[0].parent.parent.resolve() == Path(run_dir).resolve()
            clear_checkpoints(run_dir, keep_checkpoints=own)
        except CheckpointError as error:
            choice = [error]  # raised on every process below, so none waits for the others
    resume_from = broadcast_object_list(choice)[0] if world > 1 else choice[0]
    if isinstance(resume_from, CheckpointError):
        raise resume_from
    state, window = RunState(total_steps=total_steps, structure=structure, config=cfg.to_dict()), MetricSums()
    if resume_from is None:
        return state, window, MetricsLog(Path(run_dir) / "metrics.jsonl", enabled=is_main)
    saved = load_checkpoint(accelerator, resume_from, policy, optimizer, scheduler, reference)
    state = replace(
        saved, total_steps=total_steps, structure=structure, config=cfg.to_dict(), finished=False, stop_reason=None
    )
    for name in saved.window["sums"]:  # the unlogged sums go to the main process; the others hold the names
        window.sums[name] = saved.window["sums"][name] if is_main else 0.0
        window.counts[name] = saved.window["counts"][name] if is_main else 0.0
    log = ContinuedMetricsLog(
        Path(run_dir) / "metrics.jsonl", Path(resume_from).parent.parent / "metrics.jsonl", saved.step, enabled=is_main
    )
    for record in log.kept:
        if not any(k in record and record[k] is None for k in ("loss", "grad_norm", "eval_loss")):
            detectors.update(record)
    if is_main:
        print(f"[dpokit] resumed from {resume_from} at step {saved.step} of {total_steps}", flush=True)
    return state, window, log
