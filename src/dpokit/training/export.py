"""The final model of a run, with its tokenizer, in out_dir/final."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from dpokit.config import Config
from dpokit.models import load_policy
from dpokit.training.checkpoint import fsync_tree, remove_atomically


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
    fsync_tree(tmp)
    if model_dir.exists():
        remove_atomically(model_dir) if model_dir.is_dir() else model_dir.unlink()
    os.replace(tmp, model_dir)


def _rebuilt(cfg: Config, state_dict: dict):
    model = load_policy(cfg)
    model.load_state_dict(state_dict, strict=False)
    return model
