"""The reference cache on disk: one folder per fingerprint, one safetensors file per split.

Layout: <root>/<fingerprint[:24]>/{train,eval}.safetensors and meta.json (the fingerprint's
parts, for humans). root = speed.ref_cache_dir, else $DPOKIT_CACHE/ref_logps, else
~/.cache/dpokit/ref_logps. Each .safetensors holds
  pair_hash  (N,) int64    example ids: row i is pair i of the tokenised split, and its hash of token ids
  logps      (N, 4) float32 reference log-probs: chosen, rejected, chosen_shared, rejected_shared
             (*_shared: summed over the first min(|chosen|, |rejected|) tokens, for LD-DPO)
with the full fingerprint, split and count in the file's metadata. Lookup is by index and
is checked against the pair's token hash, so a reordered or edited split fails loudly
instead of silently pairing a pair with another one's reference log-probs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dpokit.config import SpeedConfig
from dpokit.data.packing import pair_hash
from dpokit.data.tokenization import TokenizedPair

FORMAT_VERSION = "1"
SPLITS = ("train", "eval")


class CacheMismatch(RuntimeError):
    """A cache file does not belong to these pairs (wrong count or token hash)."""


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
    base = os.environ.get("DPOKIT_CACHE") or Path.home() / ".cache" / "dpokit"
    return Path(base) / "ref_logps"


def _split_file(folder: Path, split: str) -> Path:
    return folder / f"{split}.safetensors"


def write_split(folder: Path, split: str, digest: str, pairs: list, logps: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = _split_file(folder, split)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    hashes = torch.tensor([pair_hash(p) for p in pairs], dtype=torch.long)
    save_file({"pair_hash": hashes, "logps": logps.float().contiguous()}, str(tmp),
              metadata={"fingerprint": digest, "split": split, "count": str(len(pairs)), "format": FORMAT_VERSION})
    tmp.replace(path)  # atomic: a reader sees the old file or the whole new one
    return path


def read_split(folder: Path, split: str, digest: str) -> Optional[dict]:
    """{"pair_hash", "logps"} of a split, or None if absent or written for another fingerprint."""
    from safetensors import safe_open

    path = _split_file(folder, split)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != digest or meta.get("format") != FORMAT_VERSION:
            return None
        return {k: f.get_tensor(k) for k in ("pair_hash", "logps")}


def attach(pairs: list[TokenizedPair], table: dict, split: str = "train") -> list[CachedPair]:
    """Pairs with their cached reference log-probs, looked up by index and checked by token hash."""
    if table["pair_hash"].shape[0] != len(pairs):
        raise CacheMismatch(f"reference cache ({split}) holds {table['pair_hash'].shape[0]} pairs, the data has {len(pairs)}")
    hashes, logps = table["pair_hash"].tolist(), table["logps"].tolist()
    out = []
    for i, p in enumerate(pairs):
        if pair_hash(p) != hashes[i]:
            raise CacheMismatch(f"reference cache ({split}): pair {i} ({p.source}) has other token ids than when cached")
        out.append(CachedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.source, reference=tuple(logps[i])))
    return out
