"""Setting up a run: its directory and data, fitting its step to the loaded model and setup, and choosing where its reference log-probs come from.

make_run_dir   out_dir claimed for the run (run_dir.py); training_data: the prepared data and its summary
fit_speed      the fast step falls back to its plain step for a model outside transformers'
               attention interface, and drops the chunked LM head when the head is sharded
fit_reference_sync  a moving reference (loss.ref_sync_steps) turns the reference cache off
reference_for  reference log-probs from the on-disk cache when the step reads them (built on a
               miss with the untrained policy, which is the reference), else a live reference
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from dpokit.config import Config, ConfigError, SpeedConfig
from dpokit.data.prepare import PreparedData, format_summary
from dpokit.data.records import DataError
from dpokit.data.sft import prepare_side_files
from dpokit.packed_attention import flex_on_cpu_problem
from dpokit.ref_cache.build import ensure_reference_cache
from dpokit.reference import make_reference, prepare_reference
from dpokit.steps import Step
from dpokit.steps.token_scores import fast_path_blocker
from dpokit.sharding import resharded, shard
from dpokit.training.fsdp import fsdp_problem
from dpokit.training.run_dir import MARKER, RunDir, claim


def refuse_before_compute(cfg: Config, distributed_type: str = "NO") -> None:
    """ConfigError, before the run directory, the data and the model, for a run that could not train."""
    if not cfg.data.path:
        raise ConfigError("data.path is not set: give a preference file, a saved dataset folder or a hub id")
    problem = fsdp_problem(cfg, distributed_type)
    if problem:
        raise ConfigError(problem)
    flex = flex_on_cpu_problem(cfg.speed.attention, cfg.model.attn_implementation, torch.cuda.is_available())
    if flex:  # the forward runs on CPU; the first backward would stop the run with a torch traceback
        raise ConfigError(flex)


def fit_speed(cfg: Config, step: Step, policy, sharded: bool) -> tuple[Config, Step, list[str]]:
    """The fast step's settings (paired or SFT) for this model and setup -> (cfg, step, notes for the user)."""
    if not step.is_fast:
        return cfg, step, []
    blocker = fast_path_blocker(policy)
    if blocker:
        plain = SpeedConfig(packing=False, prefix_sharing=False, chunked_logps=False, ref_cache=False)
        plain_step = step.plain()
        return (
            dataclasses.replace(cfg, speed=plain),
            plain_step,
            [f"{blocker}: the plain {plain_step.name} step runs (speed.* off)"],
        )
    if sharded and cfg.speed.chunked_logps:  # a sharded LM head is gathered only when called as a module
        speed = dataclasses.replace(cfg.speed, chunked_logps=False)
        return (
            dataclasses.replace(cfg, speed=speed),
            step,
            ["FSDP/DeepSpeed: speed.chunked_logps is off (the LM head is sharded)"],
        )
    return cfg, step, []


def fit_reference_sync(cfg: Config, step: Step) -> tuple[Config, list[str]]:
    """A moving reference (loss.ref_sync_steps, TR-DPO) has no fixed log-probs to cache: speed.ref_cache off, said once."""
    if cfg.loss.ref_sync_steps > 0 and cfg.speed.ref_cache and step.reads_reference_cache:
        speed = dataclasses.replace(cfg.speed, ref_cache=False)
        note = (
            f"loss.ref_sync_steps={cfg.loss.ref_sync_steps}: the reference moves during training, so its log-probs cannot "
            "be cached; speed.ref_cache is off and a live reference runs"
        )
        return dataclasses.replace(cfg, speed=speed), [note]
    return cfg, []


def reference_for(cfg: Config, step: Step, policy, tokenizer, data: PreparedData, accelerator, with_reference: bool):
    """(policy, reference model or None, data): reference log-probs from the on-disk cache when the step can use them
    (built on a miss with the untrained policy, which is the reference), else a live reference (reference.make_reference).
    Under train.fsdp the policy comes back sharded (fsdp.shard), and so does a live reference; the cache is then built
    by the sharded policy, every process scoring its share of the pairs in step with the others."""
    if not (with_reference and cfg.speed.ref_cache and step.reads_reference_cache):
        reference = make_reference(policy, cfg, with_reference)  # a copy of the whole model, before sharding
        if cfg.train.fsdp:
            policy = shard(policy, cfg, accelerator.device)
            reference = shard(reference, cfg, accelerator.device, trainable=False) if reference is not None else None
        return policy, reference, data
    policy = shard(policy, cfg, accelerator.device) if cfg.train.fsdp else policy
    # A missing cache is built by every process, each scoring its shard; rank 0 gathers and writes it (ref_cache.build).
    cache, data = ensure_reference_cache(
        cfg, tokenizer, data, model=policy.to(accelerator.device), device=accelerator.device, accelerator=accelerator
    )
    policy = resharded(policy) if cfg.train.fsdp else policy  # before the optimizer takes its parameters
    if accelerator.is_main_process:
        how = f"computed in {cache.seconds:.1f}s and cached in" if cache.built else "read from the cache"
        kl = (
            "kl/chosen is logged at evaluation only (eval_kl/chosen, adapters off)"
            if cfg.lora.enabled
            else "kl/chosen is not logged (speed.ref_cache=false logs it)"
        )
        print(f"[dpokit] reference log-probs {how} {cache.folder}: no reference model in memory; {kl}", flush=True)
    return policy, None, data


def prepare(accelerator, cfg: Config, policy, optimizer, scheduler, reference):
    """Accelerate's placement: (policy, optimizer, scheduler, reference). A policy FSDP2 sharded (train.fsdp) is not
    given to Accelerate, which would wrap it in DDP; its optimizer and schedule are."""
    if cfg.train.fsdp:
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return policy, optimizer, scheduler, reference
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    return policy, optimizer, scheduler, prepare_reference(reference, accelerator)


def make_run_dir(cfg: Config, accelerator) -> RunDir:
    """out_dir, claimed for this run by the main process (run_dir.claim: marker, ownership, lock; RunDir.ready sets an
    earlier model's eval.json aside once the checks passed). Every process gets the main process's refusal."""
    owner, problem = RunDir(Path(cfg.out_dir), created=False, held=False), None
    if accelerator.is_main_process:
        try:
            owner = claim(cfg.out_dir, cfg.train.overwrite)
        except ConfigError as e:
            problem = str(e)
    if accelerator.num_processes > 1:
        problem = broadcast_object_list([problem])[0]
        if not problem:  # several machines: the checkpoints every process reads back must be where every one sees them
            problem = next((p for p in gather_object([_unseen_marker(cfg.out_dir)]) if p), None)
    if problem:
        owner.abandon()  # the main process's claim, when it made one (elsewhere a no-op)
        raise ConfigError(problem)
    return owner


def _unseen_marker(out_dir: str) -> str | None:
    """None when this process sees the main process's run-directory marker, else why that matters (one line)."""
    if (Path(out_dir) / MARKER).is_file():
        return None
    return (
        f"out_dir={out_dir} is not on a filesystem every process sees: process {os.environ.get('RANK', '?')} on "
        f"{socket.gethostname()} cannot read {MARKER} that process 0 wrote there. Put out_dir on a shared filesystem "
        "(NFS, Lustre, a mounted bucket): each process writes its checkpoint shards there and reads them back on resume"
    )


def training_data(
    cfg: Config, objective: Step, tokenizer, data: PreparedData | None, run_dir: Path, is_main: bool
) -> PreparedData:
    """The run's prepared data (given, or prepared by the step) with the SFT files beside it (data.sft_mix_path,
    data.retention_path); the main process prints and saves the summary, one section per input file."""
    data = data or objective.prepare(cfg, tokenizer)
    side, sections = prepare_side_files(cfg, tokenizer)
    data = dataclasses.replace(data, summary={**data.summary, **sections}, side={**data.side, **side})
    if is_main:
        print(format_summary(data.summary), flush=True)
        (run_dir / "data_summary.json").write_text(json.dumps(data.summary, indent=2))
    if not data.train:
        raise DataError(f"no usable training examples in {cfg.data.path}; see the data summary above")
    return data


def accelerator_for(cfg: Config, **kwargs) -> Accelerator:
    """The run's Accelerator. Accelerate keeps one mixed-precision setting per process, so a second
    `dpokit.train()` in one Python process (a notebook, a sweep, the tests) with another
    train.mixed_precision raised "AcceleratorState has already been initialized". A single process that
    no launcher started (WORLD_SIZE unset or 1) starts from a fresh state instead; under torchrun or
    accelerate launch the state belongs to the launch and is left alone.

    Under DeepSpeed (accelerate launch with a DeepSpeed config) without CUDA, DeepSpeed's CPU accelerator runs it over
    gloo; on any device its "auto" micro-batch becomes train.batch_size."""
    state = AcceleratorState._shared_state
    if (
        state
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
        and state.get("_mixed_precision") != cfg.train.mixed_precision
    ):
        AcceleratorState._reset_state(reset_partial_state=True)
    on_cpu = not torch.cuda.is_available()
    deepspeed_on_cpu = on_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed_on_cpu:  # with cpu=True Accelerate would silently run DDP; without gloo every process is rank 0 of 1
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=on_cpu and not deepspeed_on_cpu,
        step_scheduler_with_optimizer=False,
        **kwargs,
    )
    _fill_micro_batch(accelerator.state.deepspeed_plugin, cfg.train.batch_size)
    return accelerator


def _fill_micro_batch(plugin, batch_size: int) -> None:
    """DeepSpeed's micro-batch is train.batch_size: prepare() gets no dataloader, so Accelerate cannot fill the
    config's "auto" and would stop with a ValueError (any device). train_batch_size follows from it."""
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
