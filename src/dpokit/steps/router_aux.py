"""The router's load-balancing loss of a mixture-of-experts model, for every step (paired, fast paired, KTO, SFT).

A transformers MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...) declares `output_router_logits` in its
config, as TRL's DPOTrainer tests it. Each MoE layer's router gives logits (tokens, experts); the loss is the
Switch Transformer's (Fedus et al. 2021, eq. 4-6), over the tokens of every MoE layer taken together, as
transformers' `load_balancing_loss_func` computes it:

    aux_loss = E * sum_e f_e * P_e      f_e: share of the top-k assignments that go to expert e
                                        P_e: mean router probability of expert e

k (num_experts_per_tok) when the experts are used evenly, up to E (experts) when every token goes to the same k.
It enters the objective at `loss.router_aux_coef`, or the model config's `router_aux_loss_coef` when that key is
null (TRL's `router_aux_loss_coef`), and is logged as `aux_loss` (TRL's name); with 0 it is logged, not trained on.

Router logits are recorded with forward hooks on the router modules the model itself names for
`output_router_logits` (`_can_record_outputs`), around the policy's forward only: the reference never records
them, and the model never computes its own aux_loss, whose attention_mask argument a packed batch does not have.

Which tokens count, as weights per row position (a padded batch's attention mask, `packed_token_weights`):
  * padding never counts (weight 0): the plain steps pass their attention mask, the packed rows their segment ids;
  * a prompt shared by chosen and rejected (speed.prefix_sharing) counts twice (weight 2). The router sees it once,
    but the plain step (and TRL) routes it once in each of the two rows, and the loss is a token-weighted mean of the
    routing statistics, so weight 2 gives exactly the plain step's aux_loss: turning prefix sharing on changes the
    speed, never the objective. The prompt's routing is identical in both rows (it attends to itself only).

How it joins a step's loss: the loop divides the sum of `out.losses` over an optimizer step by the step's `count`
(pairs, examples, or tokens for SFT), so each example's loss gets coef * aux_loss times its share of that count
(`shares`): the step then minimises its objective + coef * (its micro-batches' aux_loss, weighted as the examples).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dpokit.config import ConfigError
from dpokit.data.packing import PROMPT
from dpokit.steps.token_scores import causal_lm


@dataclass(frozen=True)
class Router:
    """What a step needs of an MoE policy: the loss weight, top-k, and the modules whose output holds router logits."""

    coef: float
    top_k: int
    target: type  # router module class (transformers' OutputRecorder.target_class)
    index: int  # position of the logits in its output tuple


def _recorder(lm) -> tuple[type, int] | None:
    """(router class, output index) from the `_can_record_outputs` of the model or one of its submodules."""
    for module in lm.modules():
        entry = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if entry is None:
            continue
        if isinstance(entry, type):
            return entry, 0
        if getattr(entry, "target_class", None) is not None and getattr(entry, "layer_name", None) is None:
            return entry.target_class, entry.index
    return None


def router_for(model, loss) -> Router | None:
    """The policy's router (None for a dense model: no aux_loss). loss: the LossConfig (loss.router_aux_coef)."""
    lm = causal_lm(model)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    coef = loss.router_aux_coef
    recorder = _recorder(lm) if hasattr(config, "output_router_logits") else None
    top_k = getattr(config, "num_experts_per_tok", None)
    if recorder is None or not top_k:
        if coef:
            raise ConfigError(
                f"loss.router_aux_coef={coef}: {type(lm).__name__} is not a mixture-of-experts model whose "
                "router logits dpokit can read, so there is no load-balancing loss to weight; unset the key"
            )
        return None
    if coef is None:
        coef = getattr(config, "router_aux_loss_coef", None) or 0.0
    return Router(float(coef), int(top_k), *recorder)


@contextlib.contextmanager
def recording(model, router: Router | None):
    """Collects the router logits (tokens, experts) of every MoE layer while the body runs `model`; [] for no router."""
    logits: list[torch.Tensor] = []
    handles = []
    if router is not None:

        def hook(module, args, output):
            logits.append(output[router.index] if isinstance(output, (tuple, list)) else output)

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, router.target)]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, weights: torch.Tensor) -> torch.Tensor:
    """transformers' load_balancing_loss_func with per-token weights (its attention mask, generalised): () float32.

    router_logits: one (N, E) tensor per MoE layer, N = the flattened row positions; weights: (rows, width) with
    N entries, 0 on padding, 2 on a shared prompt.
    """
    device = router_logits[0].device
    w = weights.reshape(-1).to(device=device, dtype=torch.float32)
    n_experts = router_logits[0].shape[-1]
    assigned = torch.zeros(n_experts, dtype=torch.float32, device=device)
    prob = torch.zeros(n_experts, dtype=torch.float32, device=device)
    for layer in router_logits:
        probs = torch.softmax(layer.to(device).float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        assigned = assigned.scatter_add(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        prob = prob + (probs * w[:, None]).sum(0)
    total = w.sum() * len(router_logits)
    return n_experts * torch.sum((assigned / total) * (prob / total))


def packed_token_weights(batch: dict) -> torch.Tensor:
    """A data.packing batch's weights (R, L): 1 per token, 0 on padding, 2 on a prompt its chosen and rejected share."""
    segment = batch["segment_ids"]
    real = segment >= 0
    shared_unit = batch["units"][:, 4] > 0  # second_len > 0: a [prompt, chosen, rejected] unit
    shared_prompt = real & shared_unit[segment.clamp(min=0)] & (batch["branch"] == PROMPT)
    return real.float() + shared_prompt.float()


def add_router_aux(
    router: Router | None,
    router_logits: list,
    weights: torch.Tensor,
    out,
    metrics: dict,
    shares: torch.Tensor | float = 1.0,
) -> None:
    """Adds coef * aux_loss to each example's loss (times its `shares` of the step's count) and to the `loss` metric;
    logs `aux_loss`, one value per entry of the `loss` metric so it is averaged as the loss is. No router: nothing."""
    if router is None or not router_logits:
        return
    with torch.set_grad_enabled(torch.is_grad_enabled() and router.coef != 0.0):
        aux = load_balancing_loss(router_logits, router.top_k, weights)
    if router.coef != 0.0:
        out.losses = out.losses + router.coef * aux * shares
        metrics["loss"] = metrics["loss"] + router.coef * aux.detach()
    metrics["aux_loss"] = aux.detach().expand(metrics["loss"].shape[0])
