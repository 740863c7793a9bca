"""Restoring a checkpoint exactly (checkpoint.py writes them, resume.py chooses which): the weights or adapter, the
optimizer, the schedule, every process's RNG state, and a reference that moved (TR-DPO).

A dpokit checkpoint holds safetensors and JSON; under FSDP/DeepSpeed Accelerate's `load_state` reads its accelerate/
folder, and under train.fsdp torch.distributed.checkpoint its dcp/ folder (fsdp.py). A damaged or foreign folder is
one CheckpointError naming it, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, load_model

from dpokit.training.checkpoint import REFERENCE_FILE, CheckpointError, RunState, is_sharded, read_json, read_state
from dpokit.training.fsdp import DCP_FOLDER, is_fsdp, load_sharded
from dpokit.training.rng import set_rng_state


def load_checkpoint(accelerator, path: Path, policy, optimizer, scheduler, reference=None) -> RunState:
    """Restore weights (or adapter), optimizer, schedule and this process's RNG; call on every process. `reference`: gets a moved one."""
    path = Path(path)
    state = read_state(path)
    if state.ref_syncs > 0:  # the reference had moved: continuing with the original one would be another run
        if reference is None:
            raise CheckpointError(
                f"{path}: its reference moved during training (loss.ref_sync_steps, {state.ref_syncs} syncs), "
                "and this run has no separate reference to restore it into: resume with loss.ref_sync_steps > 0"
            )
        load_reference(reference, path)
    try:
        if is_sharded(accelerator):
            accelerator.load_state(str(path / "accelerate"))
        elif is_fsdp(policy) or (path / DCP_FOLDER).is_dir():
            _check_format(path, is_fsdp(policy))
            load_sharded(path, policy, optimizer)
        else:
            _load_weights(accelerator.unwrap_model(policy), path)
            optimizer.load_state_dict(_groups_of(_read_optimizer(path), optimizer))
        if not is_sharded(accelerator):  # the schedule of both dpokit formats (DeepSpeed's is in accelerate/)
            scheduler.load_state_dict(read_json(path / "scheduler.json"))
        rng = read_json(path / "rng_state.json")
    except CheckpointError:
        raise
    except Exception as e:  # a damaged or foreign folder: say which, never a traceback
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
    if len(rng) != accelerator.num_processes and accelerator.is_main_process:
        print(
            f"[dpokit] the checkpoint was written by {len(rng)} process(es), this run has {accelerator.num_processes}: "
            "random states (LoRA dropout) will not replay exactly",
            flush=True,
        )
    set_rng_state(rng[min(accelerator.process_index, len(rng) - 1)])
    return state


def _check_format(path: Path, fsdp: bool) -> None:
    """A sharded (dcp/) checkpoint resumes under train.fsdp only, and a one-file one without it: one line otherwise."""
    if fsdp and (path / "accelerate").is_dir():
        raise CheckpointError(
            f"{path} was written under DeepSpeed (accelerate/): resume it with the same accelerate launch "
            "--config_file and train.fsdp=false"
        )
    if fsdp != (path / DCP_FOLDER).is_dir():
        written, now = ("with", "without") if not fsdp else ("without", "with")
        raise CheckpointError(
            f"{path} was written {written} train.fsdp and this run is {now} it: resume with "
            f"train.fsdp={'true' if not fsdp else 'false'} (any number of processes)"
        )


def _load_weights(model, folder: Path) -> None:
    if (folder / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict  # lazy: slow to import, and only a LoRA resume needs it

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
        raise CheckpointError(
            f"{folder}: weights do not fit this model (missing {untied[:5]}, unexpected {unexpected[:5]})"
        )


def _groups_of(saved: dict, optimizer) -> dict:
    """A LoRA checkpoint from before make_optimizer dropped empty parameter groups has one more group (the empty
    no-decay one): it is left out, so the checkpoint resumes as it did."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        saved = {**saved, "param_groups": [g for g in saved["param_groups"] if g["params"]]}
    return saved


def _read_optimizer(folder: Path) -> dict:
    meta = read_json(folder / "optimizer.json")
    state: dict = {}
    for key, value in list(load_file(str(folder / "optimizer.safetensors")).items()) + list(meta["scalars"].items()):
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def load_reference(reference, folder: Path) -> None:
    """The moved reference of a checkpoint into `reference` (the unwrapped model); CheckpointError when missing or not fitting."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: the reference had moved (loss.ref_sync_steps) but {REFERENCE_FILE} is missing"
        )
    try:
        load_model(reference, str(path), device=str(next(reference.parameters()).device))
    except (RuntimeError, OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: does not fit this reference ({type(e).__name__}: {e})") from None
