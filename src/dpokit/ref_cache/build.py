"""Reference log-probs computed once, stored on disk, reused across epochs and runs.

The reference model never changes during DPO, so its log-probs of every pair are a
property of (reference weights, tokenizer, data, tokenisation settings). They are
computed once (`dpokit precompute CONFIG`, or by `dpokit train` on first use), saved,
and training then runs without a reference model in memory and without its forward.

    fingerprint.py  the cache key: what the log-probs depend on (weights, tokenizer, data, settings)
    store.py        the files: one safetensors table per split, checked against each pair's token hash
    build.py        computing them with the reference model, finding or building a run's cache, `dpokit precompute`


Numbers: the cached values are the reference log-probs in float32 from the same fast forward
as training (packing, prefix sharing, chunked LM head), so they equal a live reference's up to
float rounding (tests: <= 1e-5). What a cache cannot give: `kl/chosen`, which needs the
reference's full next-token distributions; it is not logged when training from the cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from dpokit.config import ConfigError, SpeedConfig
from dpokit.data.tokenization import TokenizedPair
from dpokit.data.vision import images_digest
from dpokit.demo.assets import load_resolved_config
from dpokit.losses import is_unpaired, needs_reference
from dpokit.models import load_policy, load_tokenizer
from dpokit.ref_cache.fingerprint import fingerprint, reference_model_config
from dpokit.ref_cache.store import SPLITS, CacheCorrupt, attach, cache_root, read_split, write_split
from dpokit.reference import reference_mode
from dpokit.sharding import is_fsdp, release_process_group, shard
from dpokit.steps import step_for
from dpokit.steps.paired import make_collate
from dpokit.steps.token_scores import reference_sequence_logps
from dpokit.steps.vision import vision_reference_logps


def length_order(pairs: list[TokenizedPair]) -> list[int]:
    """Longest first, so batches group similar lengths and the first batch shows the peak memory."""
    return sorted(
        range(len(pairs)),
        key=lambda i: -(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)),
    )


@torch.no_grad()
def compute_reference_logps(
    model,
    pairs: list[TokenizedPair],
    speed: SpeedConfig,
    pad_token_id: int,
    batch_size: int = 16,
    device=None,
    mixed_precision: str = "no",
    rank: int = 0,
    world: int = 1,
    progress: Optional[str] = None,
) -> torch.Tensor:
    """(N, 4) reference log-probs (chosen, rejected, chosen_shared, rejected_shared) of every pair, no gradient.

    `model` is the reference: a plain model, or a PEFT policy whose adapters are disabled here.
    mixed_precision (train.mixed_precision): the reference runs under the same autocast as in training.
    rank, world: compute only batches rank, rank + world, ... of the one-process batching (other rows stay 0),
    so every batch is the same set of pairs as with one process and the values are bit-identical.
    progress: the description of a progress bar on stderr (pairs done, rate, time left), shown by rank 0; None: silent.
    """

    speed = dataclasses.replace(speed, ref_cache=False)
    device = torch.device(device or next(model.parameters()).device)
    with _as_reference(model, device, mixed_precision) as ref:
        if any(getattr(p, "image_digest", "") for p in pairs):  # image rows: the plain forward with pixel values
            return vision_reference_logps(
                ref, pairs, pad_token_id, length_order(pairs), batch_size, device, rank, world
            )
        out = torch.zeros(len(pairs), 4, dtype=torch.float32)
        attn = getattr(getattr(ref, "config", None), "_attn_implementation", None)
        collate = make_collate(speed, attn)
        order = length_order(pairs)
        mine = sum(
            len(order[s : s + batch_size]) for b, s in enumerate(range(0, len(order), batch_size)) if b % world == rank
        )
        with tqdm(
            total=mine,
            desc=progress,
            unit="pair",
            disable=progress is None or rank != 0,
            dynamic_ncols=True,
            file=sys.stderr,
        ) as bar:
            for b in _my_batches(len(order), batch_size, rank, world, lockstep=is_fsdp(model)):
                idx = order[max(b, 0) * batch_size : (max(b, 0) + 1) * batch_size]
                batch = {k: v.to(device) for k, v in collate([pairs[i] for i in idx], pad_token_id).items()}
                logps, shared = reference_sequence_logps(ref, batch, speed)
                if b == FILLER:  # a sharded model's extra forward: every process takes part in every all-gather
                    continue
                n = len(idx)
                out[idx] = torch.stack([logps[:n], logps[n:], shared[:n], shared[n:]], dim=1).float().cpu()
                bar.update(n)
        return out


@contextmanager
def _as_reference(model, device: torch.device, mixed_precision: str):
    """`model` as the reference (a PEFT policy with its adapters off) in eval mode, under training's autocast;
    its training mode is restored after."""
    is_peft = hasattr(getattr(model, "module", model), "disable_adapter")
    was_training = model.training
    model.eval()
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    try:
        with reference_mode(model, None if is_peft else model) as ref, autocast:
            yield ref
    finally:
        model.train(was_training)


FILLER = -1  # a batch index in _my_batches: one more forward of batch 0, whose values are dropped


def _my_batches(n: int, batch_size: int, rank: int, world: int, lockstep: bool) -> list[int]:
    """This process's batches rank, rank + world, ... of the one-process batching of n pairs. With lockstep (a sharded
    model, whose forward is a collective) a process with fewer of them than the others ends with a FILLER."""
    count = math.ceil(n / batch_size)
    mine = list(range(rank, count, world))
    rounds = math.ceil(count / world) if lockstep else len(mine)
    return mine + [FILLER] * (rounds - len(mine))


@dataclass
class ReferenceCache:
    folder: Path
    digest: str
    built: bool  # computed now (False: read from disk)
    seconds: float = 0.0


def ensure_reference_cache(
    cfg, tokenizer, data, model=None, device=None, pad_token_id: Optional[int] = None, accelerator=None
) -> tuple[ReferenceCache, object]:
    """Read the cache for (cfg, tokenizer, data), or compute and write it; returns (cache, data with CachedPairs).

    model: the reference, or a policy that has not been trained yet (it is the reference: a
    copy of the same weights, or a LoRA model whose adapters are disabled here); ignored when
    model.ref_name_or_path names another reference. Without it a reference is loaded (from
    model.ref_name_or_path, else model.name_or_path) only if the cache has to be built, then freed.
    accelerator: with several processes every process calls this; each scores its share of the batches,
    the main process gathers them, writes the files, and then every process reads them.
    A damaged cache (unreadable file, values that fail their checksum) is moved aside with a warning and rebuilt.
    """
    rank, world = (
        (accelerator.process_index, accelerator.num_processes)
        if accelerator is not None and accelerator.num_processes > 1
        else (0, 1)
    )
    if getattr(cfg.model, "ref_name_or_path", None):
        model = None  # the policy is not the reference
    digest, parts, loaded = _cache_key(cfg, tokenizer, model, data, device)
    folder = cache_root(cfg.speed) / digest[:24]
    splits = {"train": data.train, "eval": data.eval}
    missing = [s for s in SPLITS if splits[s]] if rank else _missing_splits(folder, digest, splits)
    if world > 1:  # the main process decides, so every process takes part in the same gathers
        missing = _broadcast(accelerator, missing)
    started = time.time()
    if missing:
        pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        _build_splits(
            cfg,
            model or loaded,
            folder,
            (digest, parts),
            {s: splits[s] for s in missing},
            pad,
            device,
            accelerator,
            rank,
            world,
        )
    if world > 1:
        accelerator.wait_for_everyone()
    tables = {s: read_split(folder, s, digest) if splits[s] else None for s in SPLITS}
    del loaded
    attached = dataclasses.replace(
        data,
        train=attach(data.train, tables["train"], "train") if data.train else [],
        eval=attach(data.eval, tables["eval"], "eval") if data.eval else [],
    )
    return ReferenceCache(folder, digest, bool(missing), time.time() - started), attached


def _cache_key(cfg, tokenizer, model, data, device) -> tuple[str, dict, object]:
    """The cache's fingerprint (digest, parts), and the reference loaded to compute it when its weights are not on
    disk where they can be hashed (else None)."""
    images = images_digest(data.train + data.eval)  # None for text data: its fingerprint is unchanged
    found = fingerprint(cfg, tokenizer, model, images)
    loaded = None
    if found is None:  # weights not on disk where we can hash them: the loaded weights are the key
        loaded = model or _load_reference(cfg, device)
        found = fingerprint(cfg, tokenizer, loaded, images)
    digest, parts = found
    return digest, parts, loaded


def _build_splits(
    cfg,
    reference,
    folder: Path,
    key: tuple[str, dict],
    splits: dict,
    pad_token_id: int,
    device,
    accelerator,
    rank: int,
    world: int,
) -> None:
    """Score the pairs of `splits` with the reference (loaded here if None, freed on return); the main process
    writes their tables and meta.json."""
    digest, parts = key
    reference = reference or _load_reference(cfg, device)
    batch_size = max(cfg.train.eval_batch_size, cfg.train.batch_size)
    for s, pairs in splits.items():
        shown = f"[dpokit] reference log-probs ({s})" if cfg.train.progress_bar else None
        logps = compute_reference_logps(
            reference,
            pairs,
            cfg.speed,
            pad_token_id,
            batch_size,
            device,
            cfg.train.mixed_precision,
            rank,
            world,
            progress=shown,
        )
        if world > 1:
            logps = _gather_shards(accelerator, logps, rank, world, batch_size, pairs)
        if rank == 0:
            write_split(folder, s, digest, pairs, logps)
    if rank == 0:
        (folder / "meta.json").write_text(json.dumps({"fingerprint": digest, "parts": parts}, indent=1, default=str))


def _missing_splits(folder, digest: str, splits: dict) -> list[str]:
    """The splits with pairs whose table is absent; a damaged cache is moved aside (warning) and all are rebuilt."""
    try:
        return [s for s in SPLITS if splits[s] and read_split(folder, s, digest) is None]
    except CacheCorrupt as e:
        aside = folder.with_name(f"{folder.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        warnings.warn(
            f"dpokit: reference cache damaged ({e}); moved to {aside.name} and rebuilding", RuntimeWarning, stacklevel=3
        )
        return [s for s in SPLITS if splits[s]]


def _broadcast(accelerator, value):
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _gather_shards(accelerator, logps: torch.Tensor, rank: int, world: int, batch_size: int, pairs) -> torch.Tensor:
    """The main process's (N, 4) table from every process's rows (each holds its own batches, zeros elsewhere)."""
    from accelerate.utils import gather_object

    mine = _my_rows(rank, world, batch_size, pairs)
    shards = gather_object([(mine.nonzero().flatten().tolist(), logps[mine])])
    out = torch.zeros_like(logps)
    for rows, values in shards:
        out[rows] = values
    return out


def _my_rows(rank: int, world: int, batch_size: int, pairs) -> torch.Tensor:
    """Which rows this process scored: the batches rank, rank + world, ... of compute_reference_logps' order."""
    order = length_order(pairs)
    mask = torch.zeros(len(pairs), dtype=torch.bool)
    for b, start in enumerate(range(0, len(pairs), batch_size)):
        if b % world == rank:
            mask[order[start : start + batch_size]] = True
    return mask


def _load_reference(cfg, device=None):
    model = load_policy(reference_model_config(cfg))
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    elif torch.cuda.is_available():
        model.to("cuda")
    if cfg.train.fsdp:  # every process keeps its shard; each forward gathers the layers in turn (dpokit/sharding.py)
        model = shard(model, cfg, next(model.parameters()).device, trainable=False)
    return model


def precompute_reference(cfg, overrides=None) -> Path:
    """`dpokit precompute CONFIG`: build (or find) the reference log-prob cache of a training config.

    Loads the tokenizer and data as training does, computes the fingerprint (hashing files,
    not loading the model), and loads the reference model only if the cache is missing.
    returns the cache folder.
    """

    cfg = load_resolved_config(cfg, overrides)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # as in training: our own one-line summary
    if is_unpaired(cfg.loss) or not needs_reference(cfg.loss):
        raise ConfigError(
            f"loss.type={cfg.loss.type!r}: only paired losses that use a reference have reference "
            "log-probs to precompute (KTO's KL baseline depends on the batch; reference-free losses need none)"
        )
    tokenizer = load_tokenizer(cfg)
    data = step_for(cfg).prepare(cfg, tokenizer)  # the step's own preparation: image rows (data.vision) have theirs
    accelerator = _launched()
    try:
        cache, _ = ensure_reference_cache(
            cfg, tokenizer, data, device=accelerator.device if accelerator else None, accelerator=accelerator
        )
    finally:
        release_process_group()  # train.fsdp in a lone process: the group of one its shard made
    n_train, n_eval = len(data.train), len(data.eval)
    verb = f"built in {cache.seconds:.1f}s" if cache.built else "already up to date"
    if accelerator is None or accelerator.is_main_process:
        print(
            f"[dpokit] reference log-probs of {n_train} train / {n_eval} eval pairs {verb}: {cache.folder}", flush=True
        )
    return cache.folder


def _launched():
    """Under torchrun / accelerate launch with several processes, their Accelerator: each process scores its share
    of the pairs (with train.fsdp, a shard of the reference) and the main process writes the one cache; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())
