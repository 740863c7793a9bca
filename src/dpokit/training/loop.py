"""The training loop: one readable file, on Accelerate.

    resume (train.resume) from the latest complete checkpoint, or start fresh
    for each optimizer step:
        take grad_accum global micro-batches; this process trains on its slice of each
        policy forward (+ reference forward, no grad) -> per-sequence log-probs
        loss table -> per-example losses; backward on sum / examples in the whole step
        a NaN/Inf loss or gradient skips the update (counted; the run stops past train.max_skipped_steps)
        clip, AdamW step, schedule step
        every logging_steps: metrics averaged over all applied micro-batches and ranks -> metrics.jsonl
        every eval_steps: the same metrics on held-out pairs, prefixed eval_ (with train.eval_generate=N,
            also eval_mean_length of N sampled completions, for the length detector)
        every record also goes to the trackers of train.report_to (TensorBoard, W&B, MLflow)
        every save_steps, on SIGTERM/SIGINT, and at the end: a checkpoint (checkpoint.py)
    save the final model (full, LoRA adapter, or merged) with its tokenizer
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dpokit.data.batching import BatchStream, micro_batch, pad_id, to_device
from dpokit.training.checkpoint import (
    StopSignals, TrainingInterrupted, is_sharded, resume_command, save_checkpoint, save_final, start_or_resume,
)  # fmt: skip
from dpokit.config import Config, ConfigError, load_config
from dpokit.data.prepare import PreparedData, format_summary
from dpokit.data.records import DataError
from dpokit.training.detectors import FailureDetectors
from dpokit.training.eval_generation import eval_prompts, generation_metrics
from dpokit.training.metrics import MetricSums
from dpokit.models import load_policy, load_tokenizer
from dpokit.reference import prepare_reference
from dpokit.steps import PairedStep, Step, step_for
from dpokit.training.setup import fit_speed, reference_for
from dpokit.training.tracking import accelerator_kwargs, end_trackers, init_trackers, log_diagnosis, log_metrics

__all__ = ["Step", "TrainResult", "TrainingInterrupted", "accumulate_gradients", "evaluate", "save_final", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict  # last logged training metrics, plus eval_* from the final evaluation
    model_dir: Path
    stop_reason: Optional[str] = None  # None: finished; else why the run stopped early (no final model then)


def accumulate_gradients(policy, reference, micro_batches: list[dict], cfg: Config, accelerator, with_reference: bool, sums: MetricSums,
                         objective: Step = PairedStep(), examples_in_step: Optional[int] = None, dummies: Optional[list[bool]] = None) -> None:
    """Backward over one optimizer step's micro-batches; per-example metrics are added to `sums`.

    The loss of each micro-batch is its per-example loss sum divided by the examples in the
    whole step, so the accumulated gradient is that of the mean over the step's examples:
    batch 8 x accumulation 1 and batch 4 x accumulation 2 give the same gradient.
    `examples_in_step` counts them over all processes (default: this one's); as DDP/FSDP average
    the gradients of the processes, each one's loss is scaled by the number of processes.
    A dummy micro-batch (a process with no example left at the end of an epoch) runs forward and
    backward with weight 0, so every process takes part in every collective, and adds no metric.
    """
    from accelerate.utils import DistributedType

    dummies = dummies or [False] * len(micro_batches)
    if examples_in_step is None:
        scale = 1.0 / sum(objective.count(b) for b, dummy in zip(micro_batches, dummies) if not dummy)
    else:
        scale = accelerator.num_processes / examples_in_step
    scale *= accelerator.gradient_accumulation_steps  # undo Accelerate's (and DeepSpeed's) own division by it
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    for i, (batch, dummy) in enumerate(zip(micro_batches, dummies)):
        batch = to_device(batch, accelerator.device)
        last = i == len(micro_batches) - 1
        if deepspeed:  # the engine reduces, clips and steps inside backward, at the step's last micro-batch
            accelerator.sync_gradients = last
        # Gradients are all-reduced across processes only on the last micro-batch of the step.
        sync = contextlib.nullcontext() if last or deepspeed else accelerator.no_sync(policy)
        with sync:
            with accelerator.autocast():
                out, metrics = objective.forward(policy, reference, batch, cfg, with_reference)
            accelerator.backward(out.losses.sum() * (0.0 if dummy else scale))
        for name, values in metrics.items():
            sums.add(name, values[:0] if dummy else values)  # a dummy registers the names, with no values


@torch.no_grad()
def evaluate(policy, reference, pairs, cfg: Config, accelerator, with_reference: bool, objective: Step = PairedStep()) -> dict:
    """Metrics over every held-out example, each process scoring its slice of each global batch."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    batch_size = cfg.train.eval_batch_size or cfg.train.batch_size
    stream = BatchStream(len(pairs), batch_size, 0, shuffle=False, rank=accelerator.process_index, world=accelerator.num_processes)
    # LoRA training from the reference cache: the reference (adapters off) costs no memory, so evaluation runs it
    # live instead of reading the cache, and eval records keep eval_kl/chosen, which a cache cannot give.
    live_reference = with_reference and reference is None and cfg.lora.enabled
    for _ in range(stream.per_epoch):
        batch, _, dummy, _ = micro_batch(pairs, stream, objective.collate, pad_id(policy))
        if live_reference:
            batch = {k: v for k, v in batch.items() if k not in ("ref_logps", "ref_shared_logps")}
        with accelerator.autocast():
            _, metrics = objective.forward(policy, reference, to_device(batch, accelerator.device), cfg, with_reference)
        for name, values in metrics.items():
            sums.add(name, values[:0] if dummy else values)
    policy.train(was_training)
    return {f"eval_{k}": v for k, v in sums.reduce(accelerator).items()}


def _schedule(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total_steps)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _optimizer(cfg: Config, policy) -> torch.optim.Optimizer:
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # As HF's Trainer: biases and norm weights are not decayed (decay would pull norms towards 0).
    no_decay = {id(p) for n, p in policy.named_parameters() if p.requires_grad and ("bias" in n or "norm" in n)}
    return torch.optim.AdamW(
        [
            {"params": [p for p in trainable if id(p) not in no_decay]},
            {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay,
    )


def _agree(accelerator, *flags: bool) -> list[bool]:
    """The same decision on every process: a flag holds if it holds on any process."""
    if accelerator.num_processes == 1:
        return list(flags)
    packed = accelerator.reduce(torch.tensor([float(f) for f in flags], device=accelerator.device), reduction="sum")
    return [bool(v > 0) for v in packed.tolist()]


def _keep_step(window: MetricSums, step_sums: MetricSums, keep: bool) -> None:
    # A skipped step registers its metric names (every process must reduce the same ones) but adds nothing.
    for name in step_sums.sums:
        window.sums[name] = window.sums.get(name, 0.0) + (step_sums.sums[name] if keep else 0.0)
        window.counts[name] = window.counts.get(name, 0.0) + (step_sums.counts[name] if keep else 0.0)


def likely_cause(cfg: Config, bad_loss: bool, applied_steps: int) -> str:
    causes = []
    if cfg.train.mixed_precision == "fp16" or cfg.model.dtype == "float16":
        causes.append("float16 overflow: use train.mixed_precision=bf16 (or no) and model.dtype=bfloat16 or float32")
    if bad_loss and applied_steps == 0:
        causes.append("the loss is non-finite before any update: look for empty or fully truncated completions "
                      "(`dpokit doctor` on the data) or a model that already outputs NaN in this dtype")
    elif bad_loss:
        causes.append(f"the weights diverged: the learning rate is probably too high (optim.lr={cfg.optim.lr:g}); lower it")
    else:
        causes.append(f"exploding gradients: lower optim.lr (now {cfg.optim.lr:g})"
                      + ("" if cfg.optim.max_grad_norm > 0 else " and turn clipping on (optim.max_grad_norm=1.0)"))
    return "; ".join(causes)


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
    if not cfg.data.path:
        raise ConfigError("data.path is not set: give a preference file, a saved dataset folder or a hub id")
    # The schedule advances once per optimizer step, whatever the number of processes (see BatchStream).
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False,
                              **accelerator_kwargs(cfg))
    set_seed(cfg.train.seed)
    run_dir = Path(cfg.out_dir)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
        except OSError as e:
            raise ConfigError(f"out_dir={cfg.out_dir!r}: cannot write the run directory: {e}") from None
    init_trackers(accelerator, cfg)

    tokenizer = load_tokenizer(cfg)
    objective = step_for(cfg)
    data = data or objective.prepare(cfg, tokenizer)
    if is_main:
        print(format_summary(data.summary), flush=True)
        (run_dir / "data_summary.json").write_text(json.dumps(data.summary, indent=2))
    if not data.train:
        raise DataError(f"no usable training examples in {cfg.data.path}; see the data summary above")

    policy = load_policy(cfg)
    # reference-free losses (and SFT) build and run no reference
    with_reference = objective.needs_reference(cfg)
    cfg, objective, notes = fit_speed(cfg, objective, policy, is_sharded(accelerator))
    for note in notes if is_main else []:
        print(f"[dpokit] {note}", flush=True)
    reference, data = reference_for(cfg, objective, policy, tokenizer, data, accelerator, with_reference)
    policy.train()
    optimizer = _optimizer(cfg, policy)
    micro_per_epoch = math.ceil(len(data.train) / (cfg.train.batch_size * world))
    if cfg.train.max_steps > 0:
        total_steps = cfg.train.max_steps
    else:
        total_steps = max(1, math.ceil(cfg.train.epochs * micro_per_epoch / cfg.train.grad_accum))
    scheduler = _schedule(cfg, optimizer, total_steps)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    reference = prepare_reference(reference, accelerator)
    # Under FSDP, Accelerate clips through the wrapper, which it recognises by its whole parameter list.
    params = list(policy.parameters()) if is_sharded(accelerator) else [p for p in policy.parameters() if p.requires_grad]
    pad_id = tokenizer.pad_token_id

    detectors = FailureDetectors(cfg.detectors)
    # window: sums of every applied micro-batch since the last log; log: metrics.jsonl (continued on resume)
    state, window, log = start_or_resume(accelerator, cfg, run_dir, data.train, total_steps, policy, optimizer, scheduler, detectors)
    last_logged = next((r for r in reversed(getattr(log, "kept", [])) if "loss" in r), {})

    def log_and_diagnose(record: dict) -> None:
        # Every rank sees the same reduced record, so all ranks agree on should_stop.
        log.write(record)
        log_metrics(accelerator, record, record["step"])
        for diagnosis in detectors.update(record):
            if is_main:
                tqdm.write(str(diagnosis))
                log.write({"step": diagnosis.step, "diagnosis": dataclasses.asdict(diagnosis)})
            log_diagnosis(accelerator, diagnosis)

    # The same eval prompts and seed at every evaluation, so eval_mean_length moves only when the policy does.
    gen_prompts = eval_prompts(data.eval, tokenizer, cfg.train.eval_generate) if cfg.train.eval_generate > 0 else []
    if cfg.train.eval_generate > 0 and not gen_prompts and is_main:
        print("[dpokit] train.eval_generate is set but there is no eval data: no completions are sampled", flush=True)

    def generate_on_eval() -> dict:
        if not gen_prompts:
            return {}
        # Every rank samples (cheap, and sharded models need all ranks in generate); same seed, same numbers.
        with accelerator.autocast():
            return generation_metrics(accelerator.unwrap_model(policy), tokenizer, gen_prompts, cfg.train.eval_generate,
                                      cfg.train.seed, max_new_tokens=cfg.data.max_length - cfg.data.max_prompt_length)

    def eval_record(step: int) -> dict:
        return {"step": step, **evaluate(policy, reference, data.eval, cfg, accelerator, with_reference, objective), **generate_on_eval()}

    def checkpoint() -> Path:
        return save_checkpoint(accelerator, run_dir, state, policy, optimizer, scheduler, window, cfg.train.save_total_limit)

    if gen_prompts and state.step == 0:  # the reference's own lengths: the baseline length_drift compares against
        log_and_diagnose({"step": 0, **generate_on_eval()})
    stream = BatchStream(len(data.train), cfg.train.batch_size, cfg.train.seed, rank=accelerator.process_index, world=world, position=state.micro_seen)
    progress = tqdm(total=total_steps, initial=state.step, disable=not (is_main and cfg.train.progress_bar), desc=objective.name, dynamic_ncols=True)
    started = time.time()
    saved_at, step, signals = None, state.step, StopSignals()
    with signals:
        for step in range(state.step + 1, total_steps + 1):
            micro = [micro_batch(data.train, stream, objective.collate, pad_id, objective.weight, objective.tokens) for _ in range(cfg.train.grad_accum)]
            step_sums = MetricSums()
            accumulate_gradients(policy, reference, [m[0] for m in micro], cfg, accelerator, with_reference, step_sums, objective,
                                 examples_in_step=sum(m[1] for m in micro), dummies=[m[2] for m in micro])
            grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf)
            grad_norm = math.nan if grad_norm is None else float(grad_norm)
            local_loss = step_sums.sums.get("loss", 0.0) / max(step_sums.counts.get("loss", 0.0), 1.0)
            bad_loss, stop_requested = _agree(accelerator, not math.isfinite(local_loss), signals.signum is not None)
            learning_rate = scheduler.get_last_lr()[0]
            bad = bad_loss or not math.isfinite(grad_norm)
            if accelerator.scaler is not None or not bad:
                optimizer.step()  # under fp16 the loss scaler itself skips a non-finite update and lowers its scale
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # a skipped update still uses its step of the schedule (and its data)
            _keep_step(window, step_sums, keep=not bad)
            window.add_scalar("grad_norm", grad_norm if not bad else 0.0, 0.0 if bad else 1.0)
            state.step, state.micro_seen = step, stream.position
            state.tokens_seen += sum(m[3] for m in micro)
            overflow = bad and accelerator.scaler is not None and not bad_loss  # the loss scaler's business, not a fault
            state.overflow_steps += int(overflow)
            if bad and not overflow:
                state.skipped_steps += 1
                reason = "non-finite loss" if bad_loss else "non-finite gradient"
                log.write({"step": step, "skipped_step": {"reason": reason, "loss": local_loss, "grad_norm": grad_norm}, "skipped_steps": state.skipped_steps})
                if is_main:
                    tqdm.write(f"[dpokit] step {step}: {reason} (loss={local_loss:.4g}, grad_norm={grad_norm:.4g}); update skipped "
                               f"({state.skipped_steps} of at most train.max_skipped_steps={cfg.train.max_skipped_steps})")
            progress.update(1)

            if step % cfg.train.logging_steps == 0 or step == total_steps:
                record = {k: v for k, v in window.reduce(accelerator).items() if math.isfinite(v)}  # no applied step: no value
                window.clear()
                record.update(step=step, epoch=round(stream.position / micro_per_epoch, 4), learning_rate=learning_rate, skipped_steps=state.skipped_steps)
                record["num_tokens"] = state.tokens_seen  # TRL's running count of the input tokens trained on
                if state.overflow_steps:
                    record["overflow_steps"] = state.overflow_steps
                log_and_diagnose(record)
                last_logged = record if "loss" in record else last_logged
                if "loss" in record:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record.get('rewards/accuracies', record.get('mean_token_accuracy', math.nan)):.2f}")
            too_many = state.skipped_steps > cfg.train.max_skipped_steps
            if bad and not overflow and too_many:
                # The detectors' non_finite stop, with the offending values; our own message follows the loop.
                log_and_diagnose({"step": step, "loss": local_loss, "grad_norm": grad_norm, "skipped_steps": state.skipped_steps})
                state.stop_reason = "non_finite"
            if data.eval and cfg.train.eval_steps > 0 and step % cfg.train.eval_steps == 0 and step != total_steps and not state.stop_reason:
                log_and_diagnose(eval_record(step))
            if detectors.should_stop and not state.stop_reason:
                state.stop_reason = next(d for d in reversed(detectors.fired) if d.severity == "stop").mode
            if stop_requested and not state.stop_reason:
                state.stop_reason = "signal"
            corrupted = state.stop_reason == "non_finite" and not too_many  # a NaN evaluation: the weights are suspect
            periodic = cfg.train.save_steps > 0 and (step % cfg.train.save_steps == 0 or step == total_steps)
            if (periodic or state.stop_reason) and not corrupted:
                state.finished = step == total_steps and not state.stop_reason
                saved_at = checkpoint()
            if state.stop_reason:
                break
    progress.close()

    final = dict(last_logged)
    final["train_runtime"] = round(time.time() - started, 2)
    final["diagnoses"] = [d.mode for d in detectors.fired]
    final["skipped_steps"] = state.skipped_steps
    model_dir = run_dir / "final"
    if state.stop_reason == "signal":
        command = resume_command(cfg, run_dir, world)
        message = f"[dpokit] stopped at step {step} of {total_steps}; checkpoint saved to {saved_at}. Resume with:\n  {command}"
        if is_main:
            print(message, flush=True)
        raise TrainingInterrupted(message, saved_at, command, signals.signum)
    if state.stop_reason == "non_finite" and state.skipped_steps > cfg.train.max_skipped_steps:
        if is_main:
            print(f"[dpokit] stopped at step {step}: {state.skipped_steps} steps had a non-finite loss or gradient "
                  f"(more than train.max_skipped_steps={cfg.train.max_skipped_steps}). Likely cause: "
                  f"{likely_cause(cfg, bad_loss, step - state.skipped_steps)}. The last finite weights are in {saved_at}; "
                  f"after changing the settings, resume with:\n  {resume_command(cfg, run_dir, world)}", flush=True)
        return TrainResult(run_dir=run_dir, metrics=final, model_dir=model_dir, stop_reason=state.stop_reason)
    if data.eval:
        final_eval = eval_record(step)
        log_and_diagnose(final_eval)
        final.update({k: v for k, v in final_eval.items() if k != "step"})
    end_trackers(accelerator)
    accelerator.wait_for_everyone()
    if any(d.mode == "non_finite" for d in detectors.fired):
        # The weights are most likely NaN by now; saving them would hand the user a broken model.
        if is_main:
            print(f"[dpokit] stopped on a non-finite loss or gradient; no final model saved to {model_dir}", flush=True)
        return TrainResult(run_dir=run_dir, metrics=final, model_dir=model_dir, stop_reason="non_finite")
    full_state = accelerator.get_state_dict(policy) if is_sharded(accelerator) else None  # a collective: every process
    if is_main:
        save_final(accelerator.unwrap_model(policy), tokenizer, cfg, model_dir, full_state)
        print(f"[dpokit] done in {final['train_runtime']:.1f}s; model saved to {model_dir}", flush=True)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=run_dir, metrics=final, model_dir=model_dir, stop_reason=state.stop_reason)
