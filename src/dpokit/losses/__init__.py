"""Preference losses: pure functions of per-sequence log-probs, chosen by name from one table.

Every paired loss takes a `PairLogps` (policy and reference log-probs of the chosen and
rejected completions, summed over completion tokens, plus completion lengths) and the
`LossConfig`, and returns a `LossOutput` of per-example losses and the implicit rewards
reported as `rewards/chosen` and `rewards/rejected`. `loss.type` may be a list: the
per-example losses are summed with `loss.weights`. KTO, which is unpaired, is `kto_loss`; it is
`loss.type: kto` (UNPAIRED_LOSSES), trained through `dpokit.steps.unpaired` rather than the table.

    base.py            LossConfig, PairLogps, LossOutput; log-ratios, LD-DPO, NLL, WPO weights
    accuracy.py        preference_correct: a pair is correct when chosen > rejected strictly (a tie is 0), for
                       training's rewards/accuracies and dpokit eval's preference_accuracy
    fdiv.py            f-DPO divergences (f_divergence_type)
    paired.py          reference-based paired losses
    reference_free.py  simpo, cpo, orpo, sft
    kto.py             kto_loss
    adaptive_beta.py   beta-DPO's batch beta and its moving threshold (pure numbers; the trainer keeps the state)
    table.py           LOSSES, REFERENCE_FREE, UNPAIRED_LOSSES, get_loss, validate_loss_config, compute_loss
"""

from dpokit.losses.accuracy import preference_correct
from dpokit.losses.adaptive_beta import BETA_FLOOR, adaptive_beta, moved_threshold
from dpokit.losses.base import LossConfig, LossFn, LossOutput, PairLogps, shared_prefix_logps, wpo_weights
from dpokit.losses.fdiv import F_DIVERGENCES
from dpokit.losses.kto import kto_loss
from dpokit.losses.table import (
    BATCH_SORTED,
    F_DIVERGENCE_LOSSES,
    LOSSES,
    REFERENCE_FREE,
    UNPAIRED_LOSSES,
    compute_loss,
    get_loss,
    is_unpaired,
    loss_names,
    needs_reference,
    validate_loss_config,
)

__all__ = [
    "BETA_FLOOR",
    "adaptive_beta",
    "moved_threshold",
    "BATCH_SORTED",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSSES",
    "LOSSES",
    "REFERENCE_FREE",
    "UNPAIRED_LOSSES",
    "LossConfig",
    "LossFn",
    "LossOutput",
    "PairLogps",
    "preference_correct",
    "compute_loss",
    "get_loss",
    "is_unpaired",
    "kto_loss",
    "loss_names",
    "needs_reference",
    "shared_prefix_logps",
    "validate_loss_config",
    "wpo_weights",
]
