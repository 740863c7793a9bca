"""The one table of paired losses, and `compute_loss`, which combines them and applies WPO weights.

`kto` is also a valid `loss.type`, but not a table entry: its examples are single labelled
completions, so the trainer runs it through its own step (`dpokit.steps.unpaired`) with `kto_loss`.
"""

from __future__ import annotations

from dpokit.losses import paired, reference_free
from dpokit.losses.base import NLL_NORMALIZE, LossConfig, LossFn, LossOutput, PairLogps, wpo_weights
from dpokit.losses.fdiv import F_DIVERGENCES

LOSSES: dict[str, LossFn] = {
    # reference-based, paired
    "sigmoid": paired.sigmoid_loss,
    "robust": paired.robust_loss,
    "ipo": paired.ipo_loss,
    "hinge": paired.hinge_loss,
    "exo_pair": paired.exo_pair_loss,
    "nca_pair": paired.nca_pair_loss,
    "bco_pair": paired.bco_pair_loss,
    "sppo_hard": paired.sppo_hard_loss,
    "aot": paired.aot_loss,
    "aot_unpaired": paired.aot_unpaired_loss,
    "apo_zero": paired.apo_zero_loss,
    "apo_down": paired.apo_down_loss,
    "discopop": paired.discopop_loss,
    "sigmoid_norm": paired.sigmoid_norm_loss,
    # reference-free
    "simpo": reference_free.simpo_loss,
    "cpo": reference_free.cpo_loss,
    "orpo": reference_free.orpo_loss,
    "sft": reference_free.sft_loss,
}

# Losses over unpaired (completion, desirable?) examples: valid names for loss.type, trained by dpokit.steps.unpaired.
UNPAIRED_LOSSES: frozenset[str] = frozenset({"kto"})

# Losses that never read reference log-probs: no reference model is built or run for them.
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "cpo", "orpo", "sft"})

# Losses built on the chosen-minus-rejected score, where f-DPO's log Z(x) cancels (sft ignores it).
F_DIVERGENCE_LOSSES: frozenset[str] = frozenset(
    {"sigmoid", "robust", "ipo", "hinge", "exo_pair", "discopop", "sigmoid_norm", "sft"}
)

# Their i-th loss belongs to a batch order statistic, not to pair i, so per-pair WPO weights would be misaligned.
BATCH_SORTED: frozenset[str] = frozenset({"aot", "aot_unpaired"})


def get_loss(name: str) -> LossFn:
    if isinstance(name, str) and name in UNPAIRED_LOSSES:
        raise ValueError(f"loss.type {name!r} is unpaired: it has no paired loss function; use dpokit.losses.kto_loss")
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(set(LOSSES) | UNPAIRED_LOSSES))
        raise ValueError(f"unknown loss.type {name!r}; valid: {valid}") from None


def loss_names(cfg: LossConfig) -> list[str]:
    return [cfg.type] if isinstance(cfg.type, str) else list(cfg.type)


def is_unpaired(cfg: LossConfig) -> bool:
    """The loss trains on unpaired (completion, desirable?) examples (KTO), not pairs."""
    return any(name in UNPAIRED_LOSSES for name in loss_names(cfg))


def needs_reference(cfg: LossConfig) -> bool:
    """True unless every loss in `loss.type` is reference-free."""
    return not all(name in REFERENCE_FREE for name in loss_names(cfg))


def validate_loss_config(cfg: LossConfig) -> tuple[list[str], list[float]]:
    """Check the loss settings together; returns (names, weights). Raises ValueError naming the key."""
    names = loss_names(cfg)
    if not names:
        raise ValueError(f"loss.type is an empty list; valid: {', '.join(sorted(LOSSES))}")
    for name in names:
        if name not in UNPAIRED_LOSSES:
            get_loss(name)
    weights = [1.0] * len(names) if cfg.weights is None else list(cfg.weights)
    if len(weights) != len(names):
        raise ValueError(f"loss.weights has {len(weights)} entries but loss.type has {len(names)} ({names})")
    checks = [
        (cfg.beta > 0, f"loss.beta must be > 0, got {cfg.beta}"),
        (
            cfg.f_divergence_type in F_DIVERGENCES,
            f"loss.f_divergence_type {cfg.f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}",
        ),
        (
            cfg.f_divergence_type == "reverse_kl" or set(names) <= F_DIVERGENCE_LOSSES,
            f"loss.f_divergence_type={cfg.f_divergence_type} works only with {sorted(F_DIVERGENCE_LOSSES)}, not {names}",
        ),
        (
            cfg.nll_normalize in NLL_NORMALIZE,
            f"loss.nll_normalize {cfg.nll_normalize!r}; valid: {', '.join(NLL_NORMALIZE)}",
        ),
        (
            cfg.ld_alpha is None or 0.0 <= cfg.ld_alpha <= 1.0,
            f"loss.ld_alpha must be in [0, 1] or null, got {cfg.ld_alpha}",
        ),
        (
            0.0 <= cfg.label_smoothing < 0.5
            or not {"robust", "sigmoid", "aot", "aot_unpaired", "simpo", "cpo"} & set(names),
            f"loss.label_smoothing is a flip probability and must be in [0, 0.5), got {cfg.label_smoothing}",
        ),
        (
            "exo_pair" not in names or 0.0 < cfg.label_smoothing < 1.0,
            f"exo_pair needs 0 < loss.label_smoothing < 1 (the paper uses 1e-3), got {cfg.label_smoothing}",
        ),
        (
            not (cfg.use_weighting and BATCH_SORTED & set(names)),
            f"loss.use_weighting (WPO) cannot weight {sorted(BATCH_SORTED)}: they sort the batch",
        ),
        (cfg.discopop_tau > 0, f"loss.discopop_tau must be > 0, got {cfg.discopop_tau}"),
    ]
    if UNPAIRED_LOSSES & set(names):
        checks += _unpaired_checks(names, cfg)
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return names, weights


def _unpaired_checks(names: list[str], cfg: LossConfig) -> list[tuple[bool, str]]:
    # KTO's batch is single completions with a KL baseline: no pair to add a paired loss to, no shared
    # prefix for LD-DPO, no pair weight for WPO.
    return [
        (
            len(names) == 1,
            f"loss.type kto trains on unpaired examples and cannot be combined with other losses, got {names}",
        ),
        (cfg.desirable_weight > 0, f"loss.desirable_weight must be > 0, got {cfg.desirable_weight}"),
        (cfg.undesirable_weight > 0, f"loss.undesirable_weight must be > 0, got {cfg.undesirable_weight}"),
        (cfg.ld_alpha is None, "loss.ld_alpha (LD-DPO) needs paired completions; it does not apply to kto"),
        (not cfg.use_weighting, "loss.use_weighting (WPO) weights pairs; it does not apply to kto"),
    ]


def compute_loss(x: PairLogps, cfg: LossConfig) -> LossOutput:
    """Per-example loss sum_k weight_k * loss_k (each WPO-weighted if `use_weighting`); rewards of the first loss."""
    names, weights = validate_loss_config(cfg)
    if UNPAIRED_LOSSES & set(names):
        raise ValueError(
            "loss.type kto is unpaired: compute_loss takes pairs; the trainer runs kto through dpokit.steps.unpaired"
        )
    pair_weight = wpo_weights(x) if cfg.use_weighting else None  # (B,)
    outputs = [LOSSES[name](x, cfg) for name in names]
    losses = sum(
        w * (out.losses if pair_weight is None else out.losses * pair_weight) for w, out in zip(weights, outputs)
    )
    return LossOutput(losses, outputs[0].chosen_rewards, outputs[0].rejected_rewards)
