"""The training loop: one readable file, on Accelerate.

    for each optimizer step:
        take grad_accum micro-batches of pairs, each (2B, T) ordered [chosen; rejected]
        policy forward (+ reference forward, no grad) -> per-sequence log-probs
        loss table -> per-example losses; backward on sum / examples in the step
        clip, AdamW step, schedule step
        every logging_steps: metrics averaged over all micro-batches and ranks -> metrics.jsonl
        every eval_steps: the same metrics on held-out pairs, prefixed eval_
    save the final model (full, LoRA adapter, or merged) with its tokenizer
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dpokit.config import Config, load_config
from dpokit.data.collate import collate_pairs
from dpokit.data.prepare import PreparedData, format_summary, prepare_data
from dpokit.diagnostics import FailureDetectors
from dpokit.losses import loss_names
from dpokit.losses import needs_reference as loss_needs_reference
from dpokit.metrics import MetricSums, MetricsLog
from dpokit.model import load_policy, load_tokenizer, make_reference
from dpokit.preference_step import forward_pairs


@dataclass(frozen=True)
class Task:
    """How examples are prepared, batched, counted and scored.

    Paired preferences (the DPO family) and unpaired good/bad completions (KTO)
    share the whole loop and differ only here.
    """

    prepare: Callable  # (cfg, tokenizer) -> PreparedData
    collate: Callable  # (examples, pad_token_id) -> dict of tensors
    count: Callable  # batch -> number of examples in it
    forward: Callable  # (policy, reference, batch, cfg, with_reference) -> (LossOutput, {metric: (n,) tensor})


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict  # last logged training metrics, plus eval_* from the final evaluation
    model_dir: Path


PAIRED = Task(prepare=prepare_data, collate=collate_pairs, count=lambda batch: batch["input_ids"].shape[0] // 2, forward=forward_pairs)


def task_for(cfg: Config) -> Task:
    if loss_names(cfg.loss) == ["kto"]:
        from dpokit.kto_step import UNPAIRED

        return UNPAIRED
    return PAIRED


def accumulate_gradients(policy, reference, micro_batches: list[dict], cfg: Config, accelerator, with_reference: bool, sums: MetricSums, task: Task = PAIRED) -> None:
    """Backward over one optimizer step's micro-batches; per-pair metrics are added to `sums`.

    The loss of each micro-batch is its per-pair loss sum divided by the pairs in the
    whole step, so the accumulated gradient is that of the mean over the step's pairs:
    batch 8 x accumulation 1 and batch 4 x accumulation 2 give the same gradient.
    """
    n_step = sum(task.count(b) for b in micro_batches)  # examples in this step on this rank
    for i, batch in enumerate(micro_batches):
        batch = _to_device(batch, accelerator.device)
        # Gradients are all-reduced across processes only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else accelerator.no_sync(policy)
        with sync:
            with accelerator.autocast():
                out, metrics = task.forward(policy, reference, batch, cfg, with_reference)
            accelerator.backward(out.losses.sum() / n_step)
        for name, values in metrics.items():
            sums.add(name, values)


def _batches(pairs, batch_size: int, pad_token_id: int, seed: int, shuffle: bool, collate=collate_pairs):
    """An endless stream of (epoch, micro-batch); a seeded reshuffle every epoch."""
    epoch = 0
    while True:
        order = list(range(len(pairs)))
        if shuffle:
            generator = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield epoch, collate([pairs[i] for i in order[start : start + batch_size]], pad_token_id)
        epoch += 1


def _shard(pairs: list, accelerator) -> list:
    # Each process trains on its own interleaved slice: no home-made collectives, just data sharding.
    return pairs[accelerator.process_index :: accelerator.num_processes]


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(policy, reference, pairs, cfg: Config, accelerator, with_reference: bool, task: Task = PAIRED) -> dict:
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    shard = _shard(pairs, accelerator)
    for start in range(0, len(shard), batch_size):
        batch = _to_device(task.collate(shard[start : start + batch_size], _pad_id(policy)), accelerator.device)
        with accelerator.autocast():
            _, metrics = task.forward(policy, reference, batch, cfg, with_reference)
        for name, values in metrics.items():
            sums.add(name, values)
    policy.train(was_training)
    return {f"eval_{k}": v for k, v in sums.reduce(accelerator).items()}


def _pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _schedule(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _global_grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def train(config, overrides=None, data: PreparedData | None = None) -> TrainResult:
    """Run one DPO job. `config`: a Config, a dict, or a YAML path; `overrides`: ["key=value"] or {key: value}."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    cfg = load_config(config, overrides)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep the console for our own summary and progress
    from dpokit.demo.assets import resolve_demo_assets  # "demo:..." paths build the embedded demo's model/data

    cfg = resolve_demo_assets(cfg)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.train.seed)
    run_dir = Path(cfg.out_dir)
    is_main = accelerator.is_main_process
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")

    tokenizer = load_tokenizer(cfg)
    task = task_for(cfg)
    data = data or task.prepare(cfg, tokenizer)
    if is_main:
        print(format_summary(data.summary), flush=True)
        import json

        (run_dir / "data_summary.json").write_text(json.dumps(data.summary, indent=2))
    if not data.train:
        raise ValueError(f"no usable training pairs in {cfg.data.path}; see the data summary above")

    policy = load_policy(cfg)
    with_reference = loss_needs_reference(cfg.loss)  # reference-free losses build and run no reference
    reference = make_reference(policy, cfg, with_reference)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # As HF's Trainer: biases and norm weights are not decayed (decay would pull norms towards 0).
    no_decay = {id(p) for n, p in policy.named_parameters() if p.requires_grad and ("bias" in n or "norm" in n)}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if id(p) not in no_decay]},
            {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        eps=cfg.optim.adam_eps,
        weight_decay=cfg.optim.weight_decay,
    )
    shard = _shard(data.train, accelerator)
    micro_per_epoch = math.ceil(len(shard) / cfg.train.batch_size)
    if cfg.train.max_steps > 0:
        total_steps = cfg.train.max_steps
    else:
        total_steps = max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))
    scheduler = _schedule(cfg, optimizer, total_steps)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    pad_id = tokenizer.pad_token_id

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    detectors = FailureDetectors()

    def log_and_diagnose(record: dict) -> None:
        # Every rank sees the same reduced record, so all ranks agree on should_stop.
        log.write(record)
        for diagnosis in detectors.update(record):
            if is_main:
                tqdm.write(str(diagnosis))
                log.write({"step": diagnosis.step, "diagnosis": dataclasses.asdict(diagnosis)})
    stream = _batches(shard, cfg.train.batch_size, pad_id, cfg.train.seed, shuffle=True, collate=task.collate)
    window = MetricSums()  # every micro-batch since the last log
    last_logged: dict = {}
    micro_seen = 0
    progress = tqdm(total=total_steps, disable=not (is_main and cfg.train.progress_bar), desc="dpo", dynamic_ncols=True)
    started = time.time()
    for step in range(1, total_steps + 1):
        micro = [next(stream)[1] for _ in range(cfg.train.grad_accum)]
        micro_seen += len(micro)
        accumulate_gradients(policy, reference, micro, cfg, accelerator, with_reference, window, task)
        if cfg.optim.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
            grad_norm = float(grad_norm)
        else:
            grad_norm = _global_grad_norm(trainable)
        window.add_scalar("grad_norm", grad_norm)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(1)

        if step % cfg.train.logging_steps == 0 or step == total_steps:
            record = window.reduce(accelerator)
            window.clear()
            record.update(step=step, epoch=round(micro_seen / micro_per_epoch, 4), learning_rate=learning_rate)
            log_and_diagnose(record)
            last_logged = record
            progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
        if data.eval and cfg.train.eval_steps > 0 and step % cfg.train.eval_steps == 0 and step != total_steps:
            log_and_diagnose({"step": step, **evaluate(policy, reference, data.eval, cfg, accelerator, with_reference, task)})
        if detectors.should_stop:
            stop = next(d for d in reversed(detectors.fired) if d.severity == "stop")
            if is_main:
                tqdm.write(f"[dpokit] stopping at step {step}: {stop.mode}")
            break
    progress.close()

    final = dict(last_logged)
    final["train_runtime"] = round(time.time() - started, 2)
    final["diagnoses"] = [d.mode for d in detectors.fired]
    if data.eval:
        eval_record = evaluate(policy, reference, data.eval, cfg, accelerator, with_reference, task)
        log_and_diagnose({"step": step, **eval_record})
        final.update(eval_record)
    model_dir = run_dir / "final"
    accelerator.wait_for_everyone()
    if any(d.mode == "non_finite" for d in detectors.fired):
        # The weights are most likely NaN by now; saving them would hand the user a broken model.
        if is_main:
            print(f"[dpokit] stopped on a non-finite loss or gradient; no final model saved to {model_dir}", flush=True)
    elif is_main:
        save_final(accelerator.unwrap_model(policy), tokenizer, cfg, model_dir)
        print(f"[dpokit] done in {final['train_runtime']:.1f}s; model saved to {model_dir}", flush=True)
    return TrainResult(run_dir=run_dir, metrics=final, model_dir=model_dir)


def save_final(model, tokenizer, cfg: Config, model_dir: Path) -> None:
    """HF format that `from_pretrained` loads: full weights, a PEFT adapter, or LoRA merged into the base."""
    if cfg.lora.enabled and cfg.lora.save == "merged":
        model = model.merge_and_unload()
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
