"""The reference cache's key: a hash over everything the reference's log-probs depend on.

  weights    every weight file (*.safetensors, *.bin, *.pt, *.pth) and config.json of the reference's
             folder (model.ref_name_or_path if set, else model.name_or_path)
             (content hash and size; a hub id is resolved to its local snapshot), or, when no
             folder can be found, the loaded state dict's bytes; plus model.dtype, model.revision,
             model.attn_implementation, train.mixed_precision and model.quantization (they change the numbers)
  tokenizer  the tokenizer's full serialisation (vocab, merges, normaliser), chat template,
             special tokens and class
  data       content hash of data.path and data.eval_path (files, or every file of a folder;
             a hub id is keyed by name, split and the datasets cache cannot be hashed), and
             every setting that changes which pairs come out of tokenisation: split, layout,
             columns, max_rows, strict, eval_split, eval_fraction (+ train.seed when > 0),
             max_length, max_prompt_length
  images     (data.vision) every image's bytes and the processor's pixel values, hashed per pair
Any change gives another fingerprint, hence another cache folder: a stale cache is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch

from dpokit.config.paths import cache_home
from dpokit.ref_cache.store import FORMAT_VERSION
from dpokit.steps.token_scores import causal_lm

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _memo_path() -> Path:
    return cache_home() / "file_hashes.json"


def file_digest(path: Path) -> str:
    """blake2b of a file's content; remembered per (path, size, mtime) so big weights are hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = _memo_path()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.blake2b(digest_size=20)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo = {k: v for k, v in memo.items() if os.path.exists(k.rsplit("|", 2)[0])}  # forget files that are gone
    memo[key] = digest
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    except OSError:
        pass
    return digest


def _files_of(path: Path, suffixes: Optional[tuple] = None) -> dict[str, list]:
    """{relative name: [size, content hash]} of a file, or of the files of a folder (recursively)."""
    if path.is_file():
        return {path.name: [path.stat().st_size, file_digest(path)]}
    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if suffixes is None or f.name.endswith(suffixes) or f.name == "config.json":
            if suffixes is None and (f.name.startswith(".") or "/." in f.as_posix()):
                continue
            out[f.relative_to(path).as_posix()] = [f.stat().st_size, file_digest(f)]
    return out


def _local_model_dir(cfg) -> Optional[Path]:
    path = Path(cfg.model.name_or_path)
    if path.is_dir():
        return path
    try:  # a hub id already downloaded: its snapshot folder
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.model.name_or_path, revision=cfg.model.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local hub cache: fall back to the loaded weights
        return None


def state_dict_digest(model) -> str:
    """Hash of every tensor (name, dtype, shape, bytes) of a model's state dict."""
    h = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # an FSDP2 shard: the whole tensor
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(cfg, model=None) -> Optional[dict]:
    """The reference weights' part of the fingerprint; None if it needs the loaded model and none was given."""
    settings = {
        "dtype": cfg.model.dtype,
        "revision": cfg.model.revision,
        "attn_implementation": cfg.model.attn_implementation,
        "mixed_precision": cfg.train.mixed_precision,
    }
    if (
        cfg.model.quantization != "none"
    ):  # a 4-bit base has other log-probs (keys of unquantized caches stay as they were)
        settings["quantization"] = cfg.model.quantization
    if cfg.train.fsdp and cfg.train.mixed_precision != "no":  # FSDP2 casts the weights themselves (sharding.py), where
        settings["fsdp_param_dtype"] = cfg.train.mixed_precision  # autocast keeps float32 norms: other log-probs
    folder = _local_model_dir(cfg)
    if folder is not None:
        files = _files_of(folder, WEIGHT_SUFFIXES)
        if any(name.endswith(WEIGHT_SUFFIXES) for name in files):
            return {"files": files, **settings}
    if model is None:
        return None
    return {"state_dict": state_dict_digest(causal_lm(model)), **settings}


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    h.update(
        json.dumps(
            {
                "class": type(tokenizer).__name__,
                "chat_template": getattr(tokenizer, "chat_template", None),
                "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
                "added": sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items()),
                "len": len(tokenizer),
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()


def _data_source(path: Optional[str]) -> Optional[dict]:
    if not path:
        return None
    p = Path(path)
    if p.exists():
        return {"files": _files_of(p)}
    return {"hub_id": path}  # content of a hub dataset cannot be hashed here; the per-pair hashes still guard it


def data_fingerprint(cfg) -> dict:
    d = cfg.data
    return {
        "train": _data_source(d.path),
        "eval": _data_source(d.eval_path),
        "split": d.split,
        "eval_split": d.eval_split,
        "layout": d.layout,
        "columns": dict(sorted(d.columns.items())),
        "max_rows": d.max_rows,
        "strict": d.strict,
        "eval_fraction": d.eval_fraction,
        "seed": cfg.train.seed if d.eval_fraction > 0 and not d.eval_path else None,
        "max_length": d.max_length,
        "max_prompt_length": d.max_prompt_length,
    }


def fingerprint(cfg, tokenizer, model=None, images: Optional[str] = None) -> Optional[tuple[str, dict]]:
    """(hex digest, its parts), or None when the weights can only be fingerprinted from a loaded model.

    The weights are the reference's: model.ref_name_or_path when set, else model.name_or_path.
    images (data.vision rows): data/vision.images_digest of the pairs, a hash of every image's bytes and of
    the processor's pixel values, so a changed image (or image processor) gives another cache.
    """
    weights = weights_fingerprint(reference_model_config(cfg), model)
    if weights is None:
        return None
    parts = {
        "format": FORMAT_VERSION,
        "weights": weights,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data_fingerprint(cfg),
    }
    if images is not None:  # only image data has the key: text caches keep their fingerprint
        parts["images"] = images
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()
    return digest, parts


def reference_model_config(cfg):
    """The config that loads the reference: model.ref_name_or_path if set (else the policy's model), no LoRA,
    no checkpointing; its model.name_or_path is also what the weights fingerprint hashes."""
    model = cfg.model
    if getattr(model, "ref_name_or_path", None):
        model = dataclasses.replace(model, name_or_path=model.ref_name_or_path)
    return dataclasses.replace(
        cfg,
        model=model,
        lora=dataclasses.replace(cfg.lora, enabled=False),
        train=dataclasses.replace(cfg.train, gradient_checkpointing=False),
    )
