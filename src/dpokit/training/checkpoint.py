"""Checkpoints: save a run, find the one to resume from, restore it exactly; signals; the final model.

    out_dir/checkpoints/checkpoint-<step>/
        model.safetensors (+ config.json)     full fine-tuning: every policy weight (loads with from_pretrained)
        adapter_model.safetensors (+ config)  LoRA: the adapter only; the base is re-read from model.name_or_path
        optimizer.safetensors, optimizer.json AdamW moments (tensors) and param groups
        scheduler.json, rng_state.json        schedule position; python/numpy/torch RNG states of every process
        trainer_state.json                    step, data position, counters, unlogged metric sums, config (written last)

No pickle anywhere (under FSDP/DeepSpeed the sharded model and optimizer go through
Accelerate's `save_state` into `accelerate/`, which pickles its optimizer shards). A
checkpoint is written into `.tmp-checkpoint-<step>`, flushed to disk, then renamed:
a crash mid-write leaves only a temporary folder, which is never resumed from and is
removed at the next start. Only the main process writes (except sharded backends,
whose every process writes its own shard).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shlex
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from dpokit.config import Config, ConfigError
from dpokit.training.metrics import MetricsLog, MetricSums

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# Settings that fix what a step computes and which examples it sees: resuming across a change in
# one of them would not continue the same run. Anything else (lr, beta, logging...) may change, with a notice.
STRUCTURAL_KEYS = (
    "model.name_or_path", "model.ref_name_or_path", "model.revision", "train.task", "lora.enabled", "lora.r", "lora.target_modules", "data.path", "data.split",
    "data.layout", "data.columns", "data.max_length", "data.max_prompt_length", "data.max_rows", "data.eval_fraction",
    "train.grad_accum", "train.seed", "loss.type",
)  # fmt: skip


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed from; the message says which and why (the CLI exits 2)."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT: a checkpoint was saved at the end of the current step; `resume_command` continues the run."""

    def __init__(self, message: str, checkpoint: Path, resume_command: str, signum: int):
        super().__init__(message)
        self.checkpoint, self.resume_command, self.signum = checkpoint, resume_command, signum


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


def structure_of(cfg: Config, n_train: int, fingerprint: str, world_size: int) -> dict:
    flat = _flat(cfg.to_dict())
    out = {key: flat[key] for key in STRUCTURAL_KEYS}
    out.update({"training examples": n_train, "training data fingerprint": fingerprint,
                "global batch size (train.batch_size x processes)": cfg.train.batch_size * world_size})
    return out


def data_fingerprint(examples: list) -> str:
    """A cheap hash of the tokenised training data (count and 64 evenly spaced examples)."""
    import hashlib

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
        raw = json.loads((Path(path) / STATE_FILE).read_text())
        return RunState(**raw)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a complete dpokit checkpoint ({type(e).__name__}: {e})") from None


def choose_resume(cfg: Config, run_dir: Path, structure: dict, total_steps: int) -> Optional[Path]:
    """The checkpoint `train.resume` asks for, or None for a fresh start (main process only)."""
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            return None
        path, state = found[-1], read_state(found[-1])
        changed = _structural_changes(state, structure)
        if state.finished and (changed or total_steps <= state.step):
            print(f"[dpokit] {run_dir} holds a finished run ({path.name}); starting a new run "
                  f"(train.resume={path} would continue that one)", flush=True)
            return None
    else:
        path = Path(mode).expanduser()
        if not (path / STATE_FILE).is_file() and list_checkpoints(path):
            path = list_checkpoints(path)[-1]  # a run directory: its latest checkpoint
        if not path.is_dir():
            raise CheckpointError(f"train.resume={mode!r}: no such checkpoint folder")
        state = read_state(path)
        changed = _structural_changes(state, structure)
    if changed:
        details = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed)
        raise CheckpointError(
            f"cannot resume from {path}: it was made by a run with different settings ({details}). Continue it with "
            "the same settings, start over with train.resume=never (this deletes its checkpoints), or use another out_dir"
        )
    now = _flat(cfg.to_dict())
    notes = [f"{k}: {a!r} -> {now.get(k)!r}" for k, a in _flat(state.config).items()
             if a != now.get(k) and k not in STRUCTURAL_KEYS and k not in ("train.resume", "train.max_steps", "train.epochs")]
    if notes:
        print(f"[dpokit] resuming with changed settings: {'; '.join(notes)}", flush=True)
    return path


def _structural_changes(state: RunState, structure: dict) -> list[tuple]:
    return [(k, state.structure.get(k), v) for k, v in structure.items() if state.structure.get(k) != v]


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
            _remove(path)


def _remove(path: Path) -> None:
    doomed = path.with_name(f".deleting-{path.name}-{os.getpid()}") if not path.name.startswith(".") else path
    os.replace(path, doomed)  # atomic: a crash mid-delete never leaves a half checkpoint under its real name
    shutil.rmtree(doomed, ignore_errors=True)


# --- saving ------------------------------------------------------------------------------------


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_checkpoint(accelerator, run_dir: Path, state: RunState, policy, optimizer, scheduler, window: MetricSums, keep: int) -> Path:
    """Write checkpoint-<state.step> atomically; call on every process. Returns its path."""
    from accelerate.utils import gather_object

    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"checkpoint-{state.step}", root / f".tmp-checkpoint-{state.step}"
    many = accelerator.num_processes > 1
    rng = gather_object([rng_state()]) if many else [rng_state()]
    windows = gather_object([{"sums": window.sums, "counts": window.counts}]) if many else [{"sums": window.sums, "counts": window.counts}]
    state.window = _sum_windows(windows)
    state.world_size = accelerator.num_processes
    exists = final.is_dir() and (final / STATE_FILE).is_file()  # same step saved before (resumed at it): identical
    if accelerator.is_main_process and not exists:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if is_sharded(accelerator) and not exists:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))  # sharded weights and optimizer, every process
        accelerator.wait_for_everyone()
    if accelerator.is_main_process and not exists:
        if not is_sharded(accelerator):
            _write_weights(accelerator.unwrap_model(policy), tmp)
            _write_optimizer(optimizer.state_dict(), tmp)
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "rng_state.json", rng)
        _write_json(tmp / STATE_FILE, asdict(state))  # last: its presence marks a complete folder
        _fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync(root)
        _rotate(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


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
    from safetensors.torch import save_file

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
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(folder)


def _rotate(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        _remove(path)


def rng_state() -> dict:
    import numpy

    version, internal, gauss = random.getstate()
    np_state = numpy.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


# --- restoring ---------------------------------------------------------------------------------


def load_checkpoint(accelerator, path: Path, policy, optimizer, scheduler) -> RunState:
    """Restore weights (or adapter), optimizer, schedule and this process's RNG; call on every process."""
    path = Path(path)
    state = read_state(path)
    try:
        if is_sharded(accelerator):
            accelerator.load_state(str(path / "accelerate"))
        else:
            _load_weights(accelerator.unwrap_model(policy), path)
            optimizer.load_state_dict(_read_optimizer(path))
            scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        rng = json.loads((path / "rng_state.json").read_text())
    except CheckpointError:
        raise
    except Exception as e:  # a damaged or foreign folder: say which, never a traceback
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    if len(rng) != accelerator.num_processes and accelerator.is_main_process:
        print(f"[dpokit] the checkpoint was written by {len(rng)} process(es), this run has {accelerator.num_processes}: "
              "random states (LoRA dropout) will not replay exactly", flush=True)
    set_rng_state(rng[min(accelerator.process_index, len(rng) - 1)])
    return state


def _load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{folder}: adapter weights do not fit this model: {result.unexpected_keys[:5]}")
        return
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model weights (model.safetensors or adapter_model.safetensors)")
    weights = {}
    for file in files:
        weights.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in weights if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded]  # tied weights are saved once
    if unexpected or untied:
        raise CheckpointError(f"{folder}: weights do not fit this model (missing {untied[:5]}, unexpected {unexpected[:5]})")


def _read_optimizer(folder: Path) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict = {}
    for key, value in list(load_file(str(folder / "optimizer.safetensors")).items()) + list(meta["scalars"].items()):
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


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


def start_or_resume(accelerator, cfg: Config, run_dir: Path, train_examples: list, total_steps: int, policy, optimizer,
                    scheduler, detectors) -> tuple[RunState, MetricSums, MetricsLog]:
    """Resume as train.resume says, or start fresh: (run state, unlogged metric sums, metrics log).

    The main process picks the checkpoint (and tidies out_dir/checkpoints); every process restores
    from it. The detectors replay the kept metrics records, minus the non-finite one that stopped a run.
    """
    from accelerate.utils import broadcast_object_list

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
    saved = load_checkpoint(accelerator, resume_from, policy, optimizer, scheduler)
    state = replace(saved, total_steps=total_steps, structure=structure, config=cfg.to_dict(), finished=False, stop_reason=None)
    for name in saved.window["sums"]:  # the unlogged sums go to the main process; the others hold the names
        window.sums[name] = saved.window["sums"][name] if is_main else 0.0
        window.counts[name] = saved.window["counts"][name] if is_main else 0.0
    log = ContinuedMetricsLog(Path(run_dir) / "metrics.jsonl", Path(resume_from).parent.parent / "metrics.jsonl", saved.step, enabled=is_main)
    for record in log.kept:
        if not any(k in record and record[k] is None for k in ("loss", "grad_norm", "eval_loss")):
            detectors.update(record)
    if is_main:
        print(f"[dpokit] resumed from {resume_from} at step {saved.step} of {total_steps}", flush=True)
    return state, window, log


# --- signals -----------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step (and save); a second one acts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])  # a second signal aborts at once
        print(f"\n[dpokit] {signal.Signals(signum).name} received: saving a checkpoint at the end of this step "
              "(send it again to abort without saving)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_command(cfg: Config, run_dir: Path, num_processes: int) -> str:
    args = [str((run_dir / "config.yaml").resolve()), "train.resume=auto"]
    if not Path(cfg.out_dir).is_absolute():
        args.append(f"out_dir={run_dir.resolve()}")
    quoted = " ".join(shlex.quote(a) for a in args)
    if num_processes == 1:
        return f"dpokit train {quoted}"
    # The same launcher as this run (its other options, e.g. for several machines, as they were).
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(num_processes))
    if "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by accelerate launch
        return f"accelerate launch --num_processes {num_processes} -m dpokit.cli train {quoted}  (plus your other launcher options)"
    return f"torchrun --nproc_per_node {per_node} -m dpokit.cli train {quoted}  (plus your other launcher options)"


# --- the final model ---------------------------------------------------------------------------


def save_final(model, tokenizer, cfg: Config, model_dir: Path, state_dict: Optional[dict] = None) -> None:
    """HF format that `from_pretrained` loads (full weights, a PEFT adapter, or LoRA merged), written atomically.

    `state_dict`: the full (gathered) weights under FSDP/DeepSpeed, where `model`'s own are shards.
    """
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(f".tmp-{model_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if cfg.lora.enabled and cfg.lora.save == "merged":
        if state_dict is not None:  # sharded: rebuild the model on CPU from the gathered weights, then merge
            model = _rebuilt(cfg, state_dict)
            state_dict = None
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    if model_dir.exists():
        _remove(model_dir) if model_dir.is_dir() else model_dir.unlink()
    os.replace(tmp, model_dir)


def _rebuilt(cfg: Config, state_dict: dict):
    from dpokit.models import load_policy

    model = load_policy(cfg)
    model.load_state_dict(state_dict, strict=False)
    return model

