"""Reference log-probs computed once, stored on disk, reused across epochs and runs.

The reference model never changes during DPO, so its log-probs of every pair are a
property of (reference weights, tokenizer, data, tokenisation settings). They are
computed once (`dpokit precompute CONFIG`, or by `dpokit train` on first use), saved,
and training then runs without a reference model in memory and without its forward.

Cache key (the *fingerprint*), a hash over:
  weights    every weight file (*.safetensors, *.bin, *.pt, *.pth) and config.json of the reference's
             folder (model.ref_name_or_path if set, else model.name_or_path)
             (content hash and size; a hub id is resolved to its local snapshot), or, when no
             folder can be found, the loaded state dict's bytes; plus model.dtype, model.revision,
             model.attn_implementation and train.mixed_precision (they change the numbers)
  tokenizer  the tokenizer's full serialisation (vocab, merges, normaliser), chat template,
             special tokens and class
  data       content hash of data.path and data.eval_path (files, or every file of a folder;
             a hub id is keyed by name, split and the datasets cache cannot be hashed), and
             every setting that changes which pairs come out of tokenisation: split, layout,
             columns, max_rows, strict, eval_split, eval_fraction (+ train.seed when > 0),
             max_length, max_prompt_length
Any change gives another fingerprint, hence another cache folder: a stale cache is never read.

Layout: <root>/<fingerprint[:24]>/{train,eval}.safetensors and meta.json (the fingerprint's
parts, for humans). root = speed.ref_cache_dir, else $DPOKIT_CACHE/ref_logps, else
~/.cache/dpokit/ref_logps. Each .safetensors holds
  pair_hash  (N,) int64    example ids: row i is pair i of the tokenised split, and its hash of token ids
  logps      (N, 4) float32 reference log-probs: chosen, rejected, chosen_shared, rejected_shared
             (*_shared: summed over the first min(|chosen|, |rejected|) tokens, for LD-DPO)
with the full fingerprint, split and count in the file's metadata. Lookup is by index and
is checked against the pair's token hash, so a reordered or edited split fails loudly
instead of silently pairing a pair with another one's reference log-probs.

Numbers: the cached values are the reference log-probs in float32 from the same fast forward
as training (packing, prefix sharing, chunked LM head), so they equal a live reference's up to
float rounding (tests: <= 1e-5). What a cache cannot give: `kl/chosen`, which needs the
reference's full next-token distributions; it is not logged when training from the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dpokit.config import SpeedConfig
from dpokit.data.packing import pair_hash
from dpokit.data.tokenization import TokenizedPair
from dpokit.preference_step import make_collate, reference_sequence_logps

FORMAT_VERSION = "1"
SPLITS = ("train", "eval")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


# --------------------------------------------------------------------------- fingerprints


def _memo_path() -> Path:
    base = os.environ.get("DPOKIT_CACHE") or Path.home() / ".cache" / "dpokit"
    return Path(base) / "file_hashes.json"


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
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(cfg, model=None) -> Optional[dict]:
    """The reference weights' part of the fingerprint; None if it needs the loaded model and none was given."""
    settings = {"dtype": cfg.model.dtype, "revision": cfg.model.revision, "attn_implementation": cfg.model.attn_implementation,
                "mixed_precision": cfg.train.mixed_precision}
    folder = _local_model_dir(cfg)
    if folder is not None:
        files = _files_of(folder, WEIGHT_SUFFIXES)
        if any(name.endswith(WEIGHT_SUFFIXES) for name in files):
            return {"files": files, **settings}
    if model is None:
        return None
    from dpokit.preference_step import _causal_lm

    return {"state_dict": state_dict_digest(_causal_lm(model)), **settings}


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=20)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items()),
        "len": len(tokenizer),
    }, sort_keys=True, default=str).encode())
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
        "train": _data_source(d.path), "eval": _data_source(d.eval_path),
        "split": d.split, "eval_split": d.eval_split, "layout": d.layout, "columns": dict(sorted(d.columns.items())),
        "max_rows": d.max_rows, "strict": d.strict, "eval_fraction": d.eval_fraction,
        "seed": cfg.train.seed if d.eval_fraction > 0 and not d.eval_path else None,
        "max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
    }


def fingerprint(cfg, tokenizer, model=None) -> Optional[tuple[str, dict]]:
    """(hex digest, its parts), or None when the weights can only be fingerprinted from a loaded model.

    The weights are the reference's: model.ref_name_or_path when set, else model.name_or_path.
    """
    weights = weights_fingerprint(_reference_model_config(cfg), model)
    if weights is None:
        return None
    parts = {"format": FORMAT_VERSION, "weights": weights, "tokenizer": tokenizer_fingerprint(tokenizer), "data": data_fingerprint(cfg)}
    digest = hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()
    return digest, parts


# --------------------------------------------------------------------------- storage


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


# --------------------------------------------------------------------------- computing


@torch.no_grad()
def compute_reference_logps(model, pairs: list[TokenizedPair], speed: SpeedConfig, pad_token_id: int,
                            batch_size: int = 16, device=None, mixed_precision: str = "no") -> torch.Tensor:
    """(N, 4) reference log-probs (chosen, rejected, chosen_shared, rejected_shared) of every pair, no gradient.

    `model` is the reference: a plain model, or a PEFT policy whose adapters are disabled here.
    mixed_precision (train.mixed_precision): the reference runs under the same autocast as in training.
    """
    from dpokit.model import reference_mode

    speed = dataclasses.replace(speed, ref_cache=False)
    device = device or next(model.parameters()).device
    out = torch.zeros(len(pairs), 4, dtype=torch.float32)
    is_peft = hasattr(getattr(model, "module", model), "disable_adapter")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    try:
        with reference_mode(model, None if is_peft else model) as ref, autocast:
            attn = getattr(getattr(ref, "config", None), "_attn_implementation", None)
            collate = make_collate(speed, attn)
            # longest first, so batches group similar lengths and the first batch shows the peak memory
            order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate([pairs[i] for i in idx], pad_token_id).items()}
                logps, shared = reference_sequence_logps(ref, batch, speed)
                n = len(idx)
                out[idx] = torch.stack([logps[:n], logps[n:], shared[:n], shared[n:]], dim=1).float().cpu()
    finally:
        model.train(was_training)
    return out


@dataclass
class ReferenceCache:
    folder: Path
    digest: str
    built: bool  # computed now (False: read from disk)
    seconds: float = 0.0


def _reference_model_config(cfg):
    """The config that loads the reference: model.ref_name_or_path if set (else the policy's model), no LoRA,
    no checkpointing; its model.name_or_path is also what the weights fingerprint hashes."""
    model = cfg.model
    if getattr(model, "ref_name_or_path", None):
        model = dataclasses.replace(model, name_or_path=model.ref_name_or_path)
    return dataclasses.replace(cfg, model=model, lora=dataclasses.replace(cfg.lora, enabled=False),
                               train=dataclasses.replace(cfg.train, gradient_checkpointing=False))


def ensure_reference_cache(cfg, tokenizer, data, model=None, device=None, pad_token_id: Optional[int] = None) -> tuple[ReferenceCache, object]:
    """Read the cache for (cfg, tokenizer, data), or compute and write it; returns (cache, data with CachedPairs).

    model: the reference, or a policy that has not been trained yet (it is the reference: a
    copy of the same weights, or a LoRA model whose adapters are disabled here); ignored when
    model.ref_name_or_path names another reference. Without it a reference is loaded (from
    model.ref_name_or_path, else model.name_or_path) only if the cache has to be built, then freed.
    """
    speed = cfg.speed
    if getattr(cfg.model, "ref_name_or_path", None):
        model = None  # the policy is not the reference
    found = fingerprint(cfg, tokenizer, model)
    loaded = None
    if found is None:  # weights not on disk where we can hash them: the loaded weights are the key
        loaded = model or _load_reference(cfg, device)
        found = fingerprint(cfg, tokenizer, loaded)
    digest, parts = found
    folder = cache_root(speed) / digest[:24]
    splits = {"train": data.train, "eval": data.eval}
    tables = {s: read_split(folder, s, digest) for s in SPLITS}
    built = False
    started = time.time()
    if any(tables[s] is None and splits[s] for s in SPLITS):
        ref_model = model or loaded or _load_reference(cfg, device)
        pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        batch_size = max(cfg.train.eval_batch_size, cfg.train.batch_size)
        for s in SPLITS:
            if tables[s] is None and splits[s]:
                logps = compute_reference_logps(ref_model, splits[s], speed, pad, batch_size, device, cfg.train.mixed_precision)
                write_split(folder, s, digest, splits[s], logps)
                tables[s] = read_split(folder, s, digest)
        (folder / "meta.json").write_text(json.dumps({"fingerprint": digest, "parts": parts}, indent=1, default=str))
        built = True
        del ref_model
    del loaded
    attached = dataclasses.replace(
        data,
        train=attach(data.train, tables["train"], "train") if data.train else [],
        eval=attach(data.eval, tables["eval"], "eval") if data.eval else [],
    )
    return ReferenceCache(folder, digest, built, time.time() - started), attached


def _load_reference(cfg, device=None):
    from dpokit.model import load_policy

    model = load_policy(_reference_model_config(cfg))
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    elif torch.cuda.is_available():
        model.to("cuda")
    return model


def precompute_reference(cfg, overrides=None) -> Path:
    """`dpokit precompute CONFIG`: build (or find) the reference log-prob cache of a training config.

    Loads the tokenizer and data as training does, computes the fingerprint (hashing files,
    not loading the model), and loads the reference model only if the cache is missing.
    returns the cache folder.
    """
    from dpokit.config import load_config
    from dpokit.demo.assets import resolve_demo_assets
    from dpokit.model import load_tokenizer
    from dpokit.config import ConfigError
    from dpokit.losses import loss_names, needs_reference
    from dpokit.tasks import task_for

    cfg = resolve_demo_assets(load_config(cfg, overrides))
    import transformers

    transformers.utils.logging.disable_progress_bar()  # as in training: our own one-line summary
    if loss_names(cfg.loss) == ["kto"] or not needs_reference(cfg.loss):
        raise ConfigError(f"loss.type={cfg.loss.type!r}: only paired losses that use a reference have reference "
                          "log-probs to precompute (KTO's KL baseline depends on the batch; reference-free losses need none)")
    tokenizer = load_tokenizer(cfg)
    data = task_for(cfg).prepare(cfg, tokenizer)
    cache, _ = ensure_reference_cache(cfg, tokenizer, data)
    n_train, n_eval = len(data.train), len(data.eval)
    verb = f"built in {cache.seconds:.1f}s" if cache.built else "already up to date"
    print(f"[dpokit] reference log-probs of {n_train} train / {n_eval} eval pairs {verb}: {cache.folder}", flush=True)
    return cache.folder
