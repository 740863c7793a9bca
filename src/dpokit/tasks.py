"""Which step a run takes: how examples are prepared, batched, counted and scored, and where the reference comes from.

    train.task=sft                 -> sft_step.SFT
    loss.type=kto                  -> kto_step.UNPAIRED
    a paired loss, any speed.* on  -> the fast paired step (preference_step.forward_pairs_fast on
                                      data.packing rows), reference log-probs from the on-disk cache
    every speed.* off              -> PAIRED: the plain [chosen; rejected] step with a live reference

`fit_speed` then adapts the fast step to the loaded model and setup; `reference_for` gives the
reference model (or None, with cached log-probs attached to the pairs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from dpokit.config import Config, SpeedConfig
from dpokit.data.collate import collate_pairs
from dpokit.data.packing import count_pairs
from dpokit.data.prepare import PreparedData, prepare_data
from dpokit.losses import loss_names
from dpokit.model import make_reference
from dpokit.preference_step import fast_path_blocker, forward_pairs, forward_pairs_fast, make_collate


@dataclass(frozen=True)
class Task:
    """How examples are prepared, batched, counted and scored.

    Paired preferences (the DPO family), unpaired good/bad completions (KTO) and SFT
    share the whole loop and differ only here.
    """

    prepare: Callable  # (cfg, tokenizer) -> PreparedData
    collate: Callable  # (examples, pad_token_id) -> dict of tensors
    count: Callable  # batch -> number of examples in it
    forward: Callable  # (policy, reference, batch, cfg, with_reference) -> (LossOutput, {metric: (n,) tensor})
    needs_reference: Optional[Callable] = None  # cfg -> bool; None: as the loss says (losses.needs_reference)
    weight: Optional[Callable] = None  # example -> its share of a step's loss denominator; None: 1 (a mean over examples)
    tokens: Optional[Callable] = None  # example -> input tokens as TRL's running `num_tokens` counts them; None: not logged
    name: str = "dpo"  # the progress bar's label


def pair_tokens(pair) -> int:
    """Tokens of a pair's two rows, prompt + chosen and prompt + rejected (TRL's DPO `num_tokens`: the prompt twice)."""
    return 2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


PAIRED = Task(prepare=prepare_data, collate=collate_pairs, count=lambda batch: batch["input_ids"].shape[0] // 2, forward=forward_pairs,
              tokens=pair_tokens)


def task_for(cfg: Config) -> Task:
    if cfg.train.task == "sft":
        from dpokit.sft_step import SFT, fast_sft

        return fast_sft(cfg) if cfg.speed.packing or cfg.speed.chunked_logps else SFT
    if loss_names(cfg.loss) == ["kto"]:
        from dpokit.kto_step import UNPAIRED

        return UNPAIRED
    if cfg.speed.any_fast_path:  # padding-free rows, shared prompts, chunked LM head, cached reference (docs/performance.md)
        return dataclasses.replace(PAIRED, collate=make_collate(cfg.speed, cfg.model.attn_implementation), count=count_pairs,
                                   forward=forward_pairs_fast)
    return PAIRED


def fit_speed(cfg: Config, task: Task, policy, sharded: bool) -> tuple[Config, Task, list[str]]:
    """The fast step's settings (paired or SFT) for this model and setup -> (cfg, task, notes for the user)."""
    from dpokit.sft_step import SFT, forward_sft_fast

    plain_task = {forward_pairs_fast: PAIRED, forward_sft_fast: SFT}.get(task.forward)
    if plain_task is None:
        return cfg, task, []
    blocker = fast_path_blocker(policy)
    if blocker:
        plain = SpeedConfig(packing=False, prefix_sharing=False, chunked_logps=False, ref_cache=False)
        return dataclasses.replace(cfg, speed=plain), plain_task, [f"{blocker}: the plain {plain_task.name} step runs (speed.* off)"]
    if sharded and cfg.speed.chunked_logps:  # a sharded LM head is gathered only when called as a module
        speed = dataclasses.replace(cfg.speed, chunked_logps=False)
        return dataclasses.replace(cfg, speed=speed), task, ["FSDP/DeepSpeed: speed.chunked_logps is off (the LM head is sharded)"]
    return cfg, task, []


def reference_for(cfg: Config, task: Task, policy, tokenizer, data: PreparedData, accelerator, with_reference: bool):
    """(reference model or None, data): reference log-probs from the on-disk cache when the fast step can use them
    (built on a miss with the untrained policy, which is the reference), else a live reference (model.make_reference)."""
    if not (with_reference and cfg.speed.ref_cache and task.forward is forward_pairs_fast):
        return make_reference(policy, cfg, with_reference), data
    from dpokit.ref_cache import ensure_reference_cache

    with accelerator.main_process_first():  # the main process builds a missing cache, the others then read it
        cache, data = ensure_reference_cache(cfg, tokenizer, data, model=policy.to(accelerator.device), device=accelerator.device)
    if accelerator.is_main_process:
        how = f"computed in {cache.seconds:.1f}s and cached in" if cache.built else "read from the cache"
        kl = ("kl/chosen is logged at evaluation only (eval_kl/chosen, adapters off)" if cfg.lora.enabled
              else "kl/chosen is not logged (speed.ref_cache=false logs it)")
        print(f"[dpokit] reference log-probs {how} {cache.folder}: no reference model in memory; {kl}", flush=True)
    return None, data
