"""The reference's NLL on the retention set (data.retention_path), computed once and kept beside the pair log-probs.

The reference never changes, so its token-mean NLL on the retention text is a property of
(reference weights, tokenizer, the tokenised retention examples), as the pair log-probs are of
their pairs. One small JSON file per key:

    <root>/retention/<key[:24]>.json    {"key", "nll_sum", "tokens", "examples", "parts"}

key = blake2b over the reference weights' fingerprint (fingerprint.weights_fingerprint: files,
dtype, mixed precision ...), the tokenizer's, and a hash of every retention example's token ids
(prompt and completion, in order). A changed retention file, max_length or tokenizer changes the
ids, hence the key: a stale value is never read. A file that does not parse or holds other
counts is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from dpokit.models import load_policy
from dpokit.ref_cache.fingerprint import reference_model_config, tokenizer_fingerprint, weights_fingerprint
from dpokit.ref_cache.store import FORMAT_VERSION, cache_root

# (model) -> (summed completion NLL, completion tokens) of the retention examples under that model
Scorer = Callable[[object], tuple[float, int]]


@dataclass
class CachedNLL:
    nll_sum: float
    tokens: int
    path: Path
    built: bool  # computed now (False: read from the cache)


def examples_digest(examples: list) -> str:
    """blake2b of every example's prompt and completion token ids, in order."""
    h = hashlib.blake2b(digest_size=20)
    for e in examples:
        h.update(json.dumps([list(e.prompt_ids), list(e.completion_ids)]).encode())
        h.update(b"|")
    return h.hexdigest()


def _key(weights: dict, tokenizer, examples: list) -> tuple[str, dict]:
    parts = {
        "format": FORMAT_VERSION,
        "kind": "retention_nll",
        "weights": weights,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "examples": examples_digest(examples),
        "count": len(examples),
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest(), parts


def _read(path: Path, key: str, count: int) -> Optional[tuple[float, int]]:
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key and stored["examples"] == count and stored["tokens"] > 0:
            return float(stored["nll_sum"]), int(stored["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def cached_reference_nll(
    cfg, tokenizer, examples: list, score: Scorer, model=None, write: bool = True, device=None
) -> CachedNLL:
    """The reference's (NLL sum, tokens) on `examples`: read from the cache, or scored now and written.

    model: the untrained policy, which is the reference (a LoRA policy: `score` turns its adapters off);
    ignored when model.ref_name_or_path names another reference, which is then loaded only on a miss.
    write: False on the processes other than the main one (they read, or score, but never write).
    device: where a reference loaded here is placed.
    """
    ref_cfg = reference_model_config(cfg)
    if getattr(cfg.model, "ref_name_or_path", None):
        model = None
    loaded = None
    weights = weights_fingerprint(ref_cfg, model)
    if weights is None:  # no weight files to hash: the loaded reference's own bytes are the key
        loaded = _load(ref_cfg, device)
        weights = weights_fingerprint(ref_cfg, loaded)
    key, parts = _key(weights, tokenizer, examples)
    path = cache_root(cfg.speed) / "retention" / f"{key[:24]}.json"
    found = _read(path, key, len(examples))
    if found is not None:
        return CachedNLL(found[0], found[1], path, built=False)
    nll_sum, tokens = score(model or loaded or _load(ref_cfg, device))
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {"key": key, "nll_sum": nll_sum, "tokens": tokens, "examples": len(examples), "parts": parts},
                indent=1,
                default=str,
            )
        )
        tmp.replace(path)  # atomic: a reader sees no file or the whole one
    return CachedNLL(nll_sum, tokens, path, built=True)


def _load(ref_cfg, device=None):
    model = load_policy(ref_cfg)
    model.eval().requires_grad_(False)
    return model if device is None else model.to(device)
