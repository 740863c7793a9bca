"""Where each doctor check turns from ok to warn (or fail); one place, documented in docs/diagnosis.md."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DoctorThresholds:
    # Dropped rows: any dropped row warns (it is data you thought you had); more than this share fails.
    dropped_fail_share: float = 0.5
    # Length bias: DPO's summed log-probs reward length, so a systematic length gap is a shortcut to learn.
    # Warn when chosen is longer (or shorter) in more than this share of pairs, or the median chosen/rejected
    # ratio passes 1.3 (or 1/1.3); and only when a sign test says the split is not chance (p below 0.05:
    # with 5 pairs or fewer no split can be told from chance, with 100 pairs 60/40 already can).
    length_share_longer: float = 0.65
    length_median_ratio: float = 1.3
    length_sign_test_p: float = 0.05
    # Truncation at data.max_length / data.max_prompt_length: a cut completion loses its EOS.
    truncation_warn_share: float = 0.05
    truncation_fail_share: float = 0.5
    # Reference log-probs, length-normalised (nats per completion token).
    min_token_logp: float = -4.0  # below: the data is far from what the reference would write
    wrong_way_margin: float = 0.5  # logp(rejected) - logp(chosen) per token above this = "strongly prefers rejected"
    wrong_way_share: float = 0.2  # more than this share of such pairs hints at label noise
