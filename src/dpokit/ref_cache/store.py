"""The reference cache on disk: one folder per fingerprint, one safetensors file per split.

Layout: <root>/<fingerprint[:24]>/{train,eval}.safetensors and meta.json (the fingerprint's
parts, for humans). root = speed.ref_cache_dir, else $DPOKIT_CACHE/ref_logps, else
~/.cache/dpokit/ref_logps. Each .safetensors holds
  pair_hash  (N,) int64    example ids: row i is pair i of the tokenised split, and its hash of token ids
  logps      (N, 4) float32 reference log-probs: chosen, rejected, chosen_shared, rejected_shared
             (*_shared: summed over the first min(|chosen|, |rejected|) tokens, for LD-DPO)
with the full fingerprint, split, count and `checksum` (blake2b of the pair_hash and logps bytes) in
the file's metadata. A file that cannot be read, or whose values do not hash to its checksum (a
flipped bit, a truncated write, a disk error), raises CacheCorrupt; build.py then moves the folder
aside and recomputes it (docs/robustness.md). Lookup is by index and
is checked against the pair's token hash, so a reordered or edited split fails loudly
instead of silently pairing a pair with another one's reference log-probs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dpokit.config import SpeedConfig
from dpokit.config.paths import cache_home
from dpokit.data.packing import pair_hash
from dpokit.data.tokenization import TokenizedPair

FORMAT_VERSION = "2"  # 2: values checksummed
SPLITS = ("train", "eval")


class CacheMismatch(RuntimeError):
    """A cache file does not belong to these pairs (wrong count or token hash)."""


class CacheCorrupt(RuntimeError):
    """A cache file cannot be read, or its values do not match the checksum written with them."""


@dataclass(repr=False)
class CachedPair(TokenizedPair):
    """A tokenised pair with its reference log-probs: (chosen, rejected, chosen_shared, rejected_shared)."""

    reference: Optional[tuple] = None

    def __repr__(self) -> str:
        # the pair's own repr: what identifies the training data (e.g. checkpoint.data_fingerprint) is unchanged
        return repr(TokenizedPair(self.prompt_ids, self.chosen_ids, self.rejected_ids, self.source))


def cache_root(speed: SpeedConfig) -> Path:
    if speed.ref_cache_dir:
        return Path(speed.ref_cache_dir)
    return cache_home() / "ref_logps"


def _split_file(folder: Path, split: str) -> Path:
    return folder / f"{split}.safetensors"


def values_checksum(pair_hashes: torch.Tensor, logps: torch.Tensor) -> str:
    """blake2b of the stored bytes: every pair hash (int64) then every log-prob (float32), in file order."""
    h = hashlib.blake2b(digest_size=20)
    for t in (pair_hashes.to(torch.int64), logps.to(torch.float32)):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_split(folder: Path, split: str, digest: str, pairs: list, logps: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = _split_file(folder, split)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    hashes = torch.tensor([pair_hash(p) for p in pairs], dtype=torch.long)
    logps = logps.float().contiguous()
    save_file(
        {"pair_hash": hashes, "logps": logps},
        str(tmp),
        metadata={
            "fingerprint": digest,
            "split": split,
            "count": str(len(pairs)),
            "format": FORMAT_VERSION,
            "checksum": values_checksum(hashes, logps),
        },
    )
    tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
    return path


def read_split(folder: Path, split: str, digest: str) -> Optional[dict]:
    """{"pair_hash", "logps"} of a split, or None if absent or written for another fingerprint or format.

    Raises CacheCorrupt when the file cannot be read or its values fail their checksum.
    """
    from safetensors import safe_open

    path = _split_file(folder, split)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != digest or meta.get("format") != FORMAT_VERSION:
                return None
            table = {k: f.get_tensor(k) for k in ("pair_hash", "logps")}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged header or body
        raise CacheCorrupt(f"{path}: unreadable ({type(e).__name__}: {str(e)[:120]})") from None
    if meta.get("checksum") != values_checksum(table["pair_hash"], table["logps"]):
        raise CacheCorrupt(f"{path}: its values do not match their checksum")
    return table


def attach(pairs: list[TokenizedPair], table: dict, split: str = "train") -> list[CachedPair]:
    """Pairs with their cached reference log-probs, looked up by index and checked by token hash."""
    if table["pair_hash"].shape[0] != len(pairs):
        raise CacheMismatch(
            f"reference cache ({split}) holds {table['pair_hash'].shape[0]} pairs, the data has {len(pairs)}"
        )
    hashes, logps = table["pair_hash"].tolist(), table["logps"].tolist()
    out = []
    for i, p in enumerate(pairs):
        if pair_hash(p) != hashes[i]:
            raise CacheMismatch(
                f"reference cache ({split}): pair {i} ({p.source}) has other token ids than when cached"
            )
        if hasattr(p, "with_reference"):  # a pair with more than token ids (data/vision.VisionPair keeps its images)
            out.append(p.with_reference(tuple(logps[i])))
        else:
            out.append(CachedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.source, reference=tuple(logps[i])))
    return out
