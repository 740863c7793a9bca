"""Build (and cache) the demo's SFT model and preference data.

In the DPO paper's sentiment experiment the starting point is a model fine-tuned
on reviews (GPT-2 SFT on IMDb). Here the equivalent is a tiny Llama trained from
scratch on the demo's review language: it learns to write fluent reviews, with
roughly the training corpus' share of positive ones, and has no preference of
its own - that is what DPO then adds.

Artefacts are cached in folders named by a hash of everything that shapes them
(the language, the model and training settings, the seed), built in a temporary
folder and renamed into place, so an interrupted build never leaves a half
folder behind and a changed setting rebuilds instead of reusing stale files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpokit.config.paths import cache_home
from dpokit.demo import world
from dpokit.data.collate import IGNORE_INDEX
from dpokit.cpu_threads import set_cpu_threads
from dpokit.tiny import build_tiny_llama, build_tokenizer, save_tiny


@dataclass(frozen=True)
class SFTConfig:
    """Model size and training schedule; the defaults build in well under 90 s on 2 idle CPU cores.

    Training well past the point where samples look fluent matters: a model
    that still gives ungrammatical words some probability lets DPO push mass
    onto them (fluency drops while the reward rises), so `steps` buys the
    demo's DPO run its robustness, not the SFT samples their looks.
    """

    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    n_sequences: int = 6000  # distinct training reviews
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    positive_share: float = 0.4  # share of positive reviews in the SFT corpus


def _version(**settings) -> str:
    blob = json.dumps({"world": world.fingerprint(), **settings}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def sft_version(config: SFTConfig = SFTConfig(), seed: int = 0) -> str:
    """The hash in the SFT model's folder name: any change to the language or settings changes it."""
    return _version(kind="sft", config=asdict(config), seed=seed)


def _cached_build(final: Path, build: Callable[[Path], None], force: bool) -> Path:
    """Run build(tmp) into a temporary sibling folder and rename it to `final`.

    The rename is atomic, so readers see either no folder or a complete one. If
    another process finished the same build first, its folder is kept and ours is
    dropped (both are identical by construction).
    """
    if final.exists() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # force: move the old folder aside first, then swap in the new one
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _batches(sequences: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator):
    """Endless shuffled right-padded batches (input_ids, attention_mask, labels)."""
    while True:
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            yield ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)


# The demo's numbers are the docs' numbers (docs/demo.md), and its small model's trajectory changes with the order
# of float sums, which changes with the thread count: one thread everywhere (the SFT build, demo.yaml's
# train.num_threads, the demo's sampling) gives the same SFT model and the same table on any number of cores.
# Two threads measured 58 s against 82 s for the demo from an empty cache; at this size that is all it costs.
DEMO_THREADS = 1


def train_sft(config: SFTConfig = SFTConfig(), seed: int = 0, log: Callable[[str], None] | None = None):
    """Train the SFT model in memory; returns (model, tokenizer, final mean loss).

    Plain next-token cross-entropy on opening + continuation + EOS: the whole
    review is modelled, and the EOS teaches the model where a review ends.
    """
    tokenizer = build_tokenizer([" ".join(world.vocabulary())], kind="word")
    model = build_tiny_llama(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        max_position_embeddings=64,
        seed=seed,
    )
    set_cpu_threads(model, DEMO_THREADS)
    corpus = world.sft_corpus(config.n_sequences, seed=seed, positive_share=config.positive_share)
    texts = [opening + continuation for opening, continuation in corpus]
    eos = tokenizer.eos_token_id
    sequences = [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(sequences, min(config.batch_size, len(sequences)), tokenizer.pad_token_id, generator)
    model.train()
    recent: list[float] = []
    # A count and an ETA: the build takes ~30 s idle and minutes on a busy machine, with nothing else to show.
    bar = tqdm(range(config.steps), desc="[demo] SFT model", unit="step", dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)
        if log is not None and (step + 1) % 100 == 0:
            log(f"sft step {step + 1}/{config.steps}: loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return model, tokenizer, sum(recent) / max(1, len(recent))


def build_sft_model(
    cache_dir: Path | None = None,
    seed: int = 0,
    force: bool = False,
    config: SFTConfig = SFTConfig(),
    log: Callable[[str], None] | None = None,
) -> Path:
    """Path to the cached SFT model folder (HF format), training it first if needed.

    The folder is cache_dir / f"sentiment-sft-{version}" and also holds
    sft_info.json (settings, final loss, build seconds). A second call returns at
    once; force=True rebuilds. Tests pass a smaller `config` to build in seconds.
    """
    final = Path(cache_dir or cache_home()) / f"sentiment-sft-{sft_version(config, seed)}"

    def build(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        start = time.perf_counter()
        model, tokenizer, loss = train_sft(config, seed, log)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "writing shards" bar is noise in the demo's output
        try:
            save_tiny(model, tokenizer, tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        info = {
            "config": asdict(config),
            "seed": seed,
            "world": world.fingerprint(),
            "final_loss": loss,
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / "sft_info.json").write_text(json.dumps(info, indent=2) + "\n")

    return _cached_build(final, build, force)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_preference_data(
    cache_dir: Path | None = None, n_train: int = 2000, n_eval: int = 200, seed: int = 0, force: bool = False
) -> tuple[Path, Path]:
    """(pairs-train.jsonl, pairs-eval.jsonl) of prompt/chosen/rejected rows, cached like the model.

    Train rows use train openings and eval rows held-out openings, so the eval
    preference accuracy measures generalisation to prompts DPO never saw. The two
    files use different seeds so that no pair is repeated across them.
    """
    version = _version(kind="pairs", n_train=n_train, n_eval=n_eval, seed=seed)
    final = Path(cache_dir or cache_home()) / f"sentiment-pairs-{version}"

    def build(tmp: Path) -> None:
        _write_jsonl(tmp / "pairs-train.jsonl", world.preference_pairs(n_train, seed=seed, split="train"))
        _write_jsonl(tmp / "pairs-eval.jsonl", world.preference_pairs(n_eval, seed=seed + 1_000_003, split="eval"))

    folder = _cached_build(final, build, force)
    return folder / "pairs-train.jsonl", folder / "pairs-eval.jsonl"


# The demo's retention set is the reviews DPO should leave alone: positive ones (build_sft_text says why).
RETENTION_POSITIVE_SHARE = 1.0


def build_sft_text(
    cache_dir: Path | None = None, n_retention: int = 200, n_mix: int = 2000, seed: int = 0, force: bool = False
) -> tuple[Path, Path]:
    """(sft-retention.jsonl, sft-mix.jsonl) of prompt/completion rows the SFT model was trained to write, cached like the pairs.

    The retention set (data.retention_path) holds only positive reviews: the text the aligned model
    should keep writing, so its NLL measures forgetting of the language (grammar, the other words)
    and not the alignment itself. A set of the corpus' own mix (60% negative) fired `forgetting` under
    the shipped demo config, and nearly all of its rise was the negative sentiment words that DPO is
    meant to make unlikely (docs/evaluation.md, "Choosing the retention set"). The mix file (data.sft_mix_path) is SFT data to mix into DPO, of
    the corpus' distribution (train openings, 40% positive). Other seeds than the SFT corpus', so
    neither repeats its rows.
    """
    version = _version(
        kind="sft-text",
        n_retention=n_retention,
        n_mix=n_mix,
        seed=seed,
        positive_share=SFTConfig.positive_share,
        retention_positive_share=RETENTION_POSITIVE_SHARE,
    )
    final = Path(cache_dir or cache_home()) / f"sentiment-sft-text-{version}"

    def rows(n: int, row_seed: int, positive_share: float) -> list[dict]:
        corpus = world.sft_corpus(n, seed=row_seed, positive_share=positive_share)
        return [{"prompt": opening, "completion": continuation} for opening, continuation in corpus]

    def build(tmp: Path) -> None:
        _write_jsonl(tmp / "sft-retention.jsonl", rows(n_retention, seed + 2_000_003, RETENTION_POSITIVE_SHARE))
        _write_jsonl(tmp / "sft-mix.jsonl", rows(n_mix, seed + 3_000_017, SFTConfig.positive_share))

    folder = _cached_build(final, build, force)
    return folder / "sft-retention.jsonl", folder / "sft-mix.jsonl"
