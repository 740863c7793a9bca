"""Checks that need the reference model: how likely it finds the data, and which side it already prefers.

DPO's implicit reward is a log-ratio against the reference. When the reference
finds the completions very unlikely, the reward is miscalibrated (distribution
shift); when it already strongly prefers the rejected side of many pairs, the
labels may be noisy. Both are visible before training, from a sample of pairs,
with log-probs divided by completion length so long and short pairs compare.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dpokit.data.tokenization import TokenizedPair
from dpokit.mitigations import MITIGATIONS
from dpokit.doctor.report import CheckResult
from dpokit.config import DoctorConfig
from dpokit.logprobs import completion_logps


@dataclass
class ReferenceScores:
    """Per-token log-probs (nats) of each sampled pair's chosen and rejected completion under the reference."""

    chosen: list[float]
    rejected: list[float]
    sources: list[str]


def sample_pairs(pairs: list[TokenizedPair], size: int, seed: int = 0) -> list[TokenizedPair]:
    """A seeded sample (the same pairs every run), sorted by length so batches pad little."""
    chosen = pairs if len(pairs) <= size else random.Random(seed).sample(pairs, size)
    return sorted(chosen, key=lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)))


def score_pairs(model, pairs: list[TokenizedPair], pad_token_id: int, batch_size: int = 8) -> ReferenceScores:
    """Length-normalised reference log-probs of both completions of every pair."""
    prompts = [p.prompt_ids for p in pairs]
    chosen = completion_logps(model, prompts, [p.chosen_ids for p in pairs], pad_token_id, batch_size)
    rejected = completion_logps(model, prompts, [p.rejected_ids for p in pairs], pad_token_id, batch_size)
    return ReferenceScores(
        chosen=[float(total) / len(p.chosen_ids) for total, p in zip(chosen, pairs)],
        rejected=[float(total) / len(p.rejected_ids) for total, p in zip(rejected, pairs)],
        sources=[p.source for p in pairs],
    )


def reference_logps_check(scores: ReferenceScores, thresholds: DoctorConfig) -> CheckResult:
    """Mean per-token log-prob of chosen and rejected: very low means off-policy data (distribution shift)."""
    n = len(scores.chosen)
    mean_chosen, mean_rejected = sum(scores.chosen) / n, sum(scores.rejected) / n
    floor = thresholds.min_token_logp
    unlikely = sum(min(c, r) < floor for c, r in zip(scores.chosen, scores.rejected)) / n
    numbers = {"pairs": n, "mean_chosen": mean_chosen, "mean_rejected": mean_rejected, "share_below_floor": unlikely}
    summary = (
        f"reference log-prob per token over {n} pairs: chosen {mean_chosen:.2f}, rejected {mean_rejected:.2f} "
        f"nats; {unlikely:.0%} of pairs have a completion below {floor:g}"
    )
    if min(mean_chosen, mean_rejected) >= floor:
        return CheckResult("reference_logps", "ok", summary, numbers=numbers)
    return CheckResult(
        "reference_logps",
        "warn",
        summary,
        f"Below {floor:g} nats per token the reference would rarely write these completions (each token has under "
        "~2% probability): the data was likely produced by a different model, and the implicit reward derived from "
        "the reference's log-probabilities becomes miscalibrated (distribution shift). "
        + MITIGATIONS["distribution_shift"],
        numbers,
    )


def reference_preference_check(scores: ReferenceScores, thresholds: DoctorConfig) -> CheckResult:
    """Share of pairs the reference already strongly prefers the wrong way: a hint of flipped labels."""
    n = len(scores.chosen)
    gaps = [r - c for c, r in zip(scores.chosen, scores.rejected)]  # > 0: the reference prefers rejected
    margin = thresholds.wrong_way_margin
    wrong = sorted(((gap, source) for gap, source in zip(gaps, scores.sources) if gap > margin), reverse=True)
    share = len(wrong) / n
    agrees = sum(gap < 0 for gap in gaps) / n
    numbers = {
        "pairs": n,
        "share_wrong_way": share,
        "share_prefers_chosen": agrees,
        "margin": margin,
        "mean_gap": sum(gaps) / n,
    }
    summary = (
        f"the reference prefers rejected by > {margin:g} nats/token in {share:.0%} of {n} pairs "
        f"(prefers chosen at all in {agrees:.0%})"
    )
    if share <= thresholds.wrong_way_share:
        return CheckResult("reference_preference", "ok", summary, numbers=numbers)
    return CheckResult(
        "reference_preference",
        "warn",
        summary,
        "DPO is meant to move the reference, so some wrong-way pairs are expected, and the reference's taste is not "
        "ground truth (it also disfavours text it would not write, e.g. padded or off-style answers). This many hints at "
        "label noise (the guide: more than ~15% mislabelled pairs lead to degenerate learning). Read the example rows, "
        "the most wrong-way first: if their 'rejected' answer is the better one, the labels are flipped. "
        + MITIGATIONS["label_noise"],
        numbers,
        [source for _, source in wrong[:5]],
    )
