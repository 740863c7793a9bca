"""Checks that need only the rows: layouts, dropped rows, identical and duplicated pairs, length bias.

They run without a model, so `dpokit doctor data.jsonl` is useful before a
model is even chosen; with a tokenizer, lengths are counted in tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import Counter

from dpokit.data.records import PreferenceExample, SkipReport
from dpokit.mitigations import MITIGATIONS
from dpokit.doctor.report import CheckResult
from dpokit.config import DoctorConfig


def _field_key(value: str | list) -> str:
    """A comparable form of a prompt or completion: whitespace-normalised text, or the messages as JSON."""
    if isinstance(value, str):
        return " ".join(value.split())
    return json.dumps([[m.get("role"), " ".join(str(m.get("content", "")).split())] for m in value])


def _prompt_key(example) -> str:
    """The prompt as compared: its text, and for image rows its images too (the same words about another picture
    are another prompt, not a repeat)."""
    images = getattr(example, "images", None)
    if not images:
        return _field_key(example.prompt)
    digest = hashlib.blake2b(digest_size=8)
    for image in images:
        digest.update(len(image).to_bytes(8, "little") + image)
    return f"{_field_key(example.prompt)}|images:{digest.hexdigest()}"


def _word_count(value: str | list) -> int:
    text = value if isinstance(value, str) else " ".join(str(m.get("content", "")) for m in value)
    return len(text.split())


def layouts_check(skips: SkipReport, examples: list[PreferenceExample]) -> CheckResult:
    """Rows per detected layout; mixing text and conversational rows means two prompt formats in one run."""
    per_layout = ", ".join(f"{name}: {count}" for name, count in skips.layouts.most_common())
    conversational = sum(ex.conversational for ex in examples)
    numbers = {
        "layouts": dict(skips.layouts),
        "conversational_rows": conversational,
        "text_rows": len(examples) - conversational,
    }
    summary = f"{skips.rows_read} rows read, {skips.rows_used} usable; {per_layout}"
    if 0 < conversational < len(examples):
        return CheckResult(
            "layouts",
            "warn",
            summary + f" ({conversational} conversational, {len(examples) - conversational} plain text)",
            "Plain-text rows are not rendered with the chat template, conversational rows are: the model "
            "is trained on two prompt formats. Convert the rows to one kind.",
            numbers,
        )
    return CheckResult("layouts", "ok", summary, numbers=numbers)


def dropped_rows_check(
    load_skips: SkipReport, token_skips: SkipReport | None, thresholds: DoctorConfig, untokenised: str = "no tokenizer"
) -> CheckResult:
    """Rows lost at loading (bad or missing fields) and at tokenisation (empty after truncation), by reason.
    untokenised: why tokenisation was not checked, when token_skips is None."""
    reasons = Counter(load_skips.skipped)
    examples = {reason: list(where) for reason, where in load_skips.examples.items()}
    if token_skips is not None:
        reasons.update(token_skips.skipped)
        for reason, where in token_skips.examples.items():
            examples.setdefault(reason, []).extend(where)
    dropped = sum(reasons.values())
    share = dropped / load_skips.rows_read if load_skips.rows_read else 0.0
    numbers = {"rows_read": load_skips.rows_read, "dropped": dropped, "share": share, "by_reason": dict(reasons)}
    scope = "" if token_skips is not None else f" (tokenisation not checked: {untokenised})"
    if not dropped:
        return CheckResult(
            "dropped_rows", "ok", f"0 of {load_skips.rows_read} rows would be dropped{scope}", numbers=numbers
        )
    by_reason = "; ".join(f"{count}: {reason}" for reason, count in reasons.most_common())
    verdict = "fail" if share > thresholds.dropped_fail_share else "warn"
    return CheckResult(
        "dropped_rows",
        verdict,
        f"{dropped} of {load_skips.rows_read} rows ({share:.1%}) would be dropped{scope}: {by_reason}",
        "Training skips these rows. Fix the fields named in the reasons (see the example rows), or map renamed "
        "columns with data.columns; rows empty after truncation need a larger data.max_length.",
        numbers,
        [w for reason, _ in reasons.most_common() for w in examples.get(reason, [])[:2]],
    )


def identical_pairs_check(examples: list[PreferenceExample]) -> CheckResult:
    """Pairs whose chosen and rejected are the same text: no preference to learn, and they drag accuracy down."""
    identical = [ex.source for ex in examples if _field_key(ex.chosen) == _field_key(ex.rejected)]
    numbers = {"identical": len(identical), "pairs": len(examples)}
    if not identical:
        return CheckResult(
            "identical_pairs", "ok", f"0 of {len(examples)} pairs have chosen == rejected", numbers=numbers
        )
    return CheckResult(
        "identical_pairs",
        "warn",
        f"{len(identical)} of {len(examples)} pairs ({len(identical) / len(examples):.1%}) have chosen == rejected "
        "(ignoring whitespace)",
        "These pairs carry no preference: their DPO gradient is zero and they count as wrong in rewards/accuracies. "
        "Remove them.",
        numbers,
        identical[:5],
    )


def duplicates_check(examples: list[PreferenceExample]) -> CheckResult:
    """Repeated prompts, repeated pairs, and contradictory pairs (the same two answers ranked both ways).

    Repeated prompts alone are fine: data.eval_fraction holds out whole prompts, so none leaks into eval.
    """
    prompts = Counter(_prompt_key(ex) for ex in examples)
    keys = [(_prompt_key(ex), _field_key(ex.chosen), _field_key(ex.rejected)) for ex in examples]
    pair_counts = Counter(keys)
    repeated_prompts = sum(count - 1 for count in prompts.values() if count > 1)
    duplicate_pairs = sum(count - 1 for count in pair_counts.values() if count > 1)
    contradictory = [ex.source for ex, (p, c, r) in zip(examples, keys) if c != r and (p, r, c) in pair_counts]
    numbers = {
        "distinct_prompts": len(prompts),
        "repeated_prompts": repeated_prompts,
        "duplicate_pairs": duplicate_pairs,
        "contradictory_pairs": len(contradictory),
    }
    summary = (
        f"{len(prompts)} distinct prompts in {len(examples)} pairs ({repeated_prompts} repeats); exact duplicate "
        f"pairs: {duplicate_pairs}; pairs ranked both ways: {len(contradictory)}"
    )
    problems = []
    if contradictory:
        problems.append(
            "Pairs ranked both ways are label noise by construction: keep one ranking or drop both. "
            + MITIGATIONS["label_noise"]
        )
    if duplicate_pairs:
        problems.append("Exact duplicate pairs weigh those pairs more than the rest: deduplicate.")
    if not problems:
        return CheckResult("duplicates", "ok", summary, numbers=numbers)
    duplicates = [ex.source for ex, key in zip(examples, keys) if pair_counts[key] > 1]
    return CheckResult("duplicates", "warn", summary, " ".join(problems), numbers, (contradictory or duplicates)[:5])


def sign_test_p(successes: int, trials: int) -> float:
    """Two-sided sign test: P(a split at least this uneven | each side equally likely), exact up to 1000 trials.

    Above that the normal approximation with continuity correction is within 1e-3 and costs nothing.
    """
    if trials == 0:
        return 1.0
    k = max(successes, trials - successes)
    if trials <= 1000:
        tail = sum(math.comb(trials, i) for i in range(k, trials + 1)) / 2**trials
    else:
        z = (k - 0.5 - trials / 2) / math.sqrt(trials / 4)
        tail = 0.5 * math.erfc(z / math.sqrt(2))
    return min(1.0, 2 * tail)


def length_bias_check(
    chosen_lengths: list[int], rejected_lengths: list[int], unit: str, thresholds: DoctorConfig
) -> CheckResult:
    """Whether chosen is systematically longer (or shorter) than rejected: a length gap is a shortcut DPO can learn.

    Robust statistics only: the median chosen/rejected ratio, the share of pairs where chosen is
    longer vs shorter, and a sign test on that split. The mean of per-pair ratios is reported but
    not judged: a few pairs with a 20x ratio drive it past any threshold while most pairs point the
    other way (hh-rlhf: mean ratio above 1, yet chosen is shorter in 56% of pairs, median 0.84).
    """
    pairs = [(c, r) for c, r in zip(chosen_lengths, rejected_lengths) if c > 0 and r > 0]
    if not pairs:
        return CheckResult("length_bias", "skip", "no pairs with non-empty completions to compare")
    ratios = sorted(c / r for c, r in pairs)
    n_longer, n_shorter = sum(c > r for c, r in pairs), sum(c < r for c, r in pairs)
    share_longer, share_shorter = n_longer / len(pairs), n_shorter / len(pairs)
    median_ratio = statistics.median(ratios)
    p_value = sign_test_p(n_longer, n_longer + n_shorter)  # ties carry no direction
    numbers = {
        "unit": unit,
        "median_ratio": median_ratio,
        "mean_ratio": sum(ratios) / len(ratios),
        "share_chosen_longer": share_longer,
        "share_chosen_shorter": share_shorter,
        "sign_test_p": p_value,
        "median_chosen": statistics.median(c for c, _ in pairs),
        "median_rejected": statistics.median(r for _, r in pairs),
    }
    summary = (
        f"chosen/rejected length ({unit}): median ratio {median_ratio:.2f}; chosen longer in {share_longer:.0%} "
        f"of {len(pairs)} pairs, shorter in {share_shorter:.0%} (sign test p={p_value:.2g}; medians "
        f"{numbers['median_chosen']:g} vs {numbers['median_rejected']:g})"
    )
    big_ratio = thresholds.length_median_ratio
    longer_bias = n_longer > n_shorter and (share_longer > thresholds.length_share_longer or median_ratio > big_ratio)
    shorter_bias = n_shorter > n_longer and (
        share_shorter > thresholds.length_share_longer or median_ratio < 1 / big_ratio
    )
    if not (longer_bias or shorter_bias) or p_value >= thresholds.length_sign_test_p:
        return CheckResult("length_bias", "ok", summary, numbers=numbers)
    direction = "longer" if longer_bias else "shorter"
    return CheckResult(
        "length_bias",
        "warn",
        summary,
        f"Chosen responses are systematically {direction}: DPO's sequence-level log-probabilities let the model learn "
        f"length itself as the preferred feature (length hacking). " + MITIGATIONS["length_hacking"],
        numbers,
    )


def word_lengths(examples: list[PreferenceExample]) -> tuple[list[int], list[int]]:
    """Completion lengths in whitespace-separated words, for when there is no tokenizer."""
    return [_word_count(ex.chosen) for ex in examples], [_word_count(ex.rejected) for ex in examples]
