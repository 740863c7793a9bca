"""Checks that need the tokenizer: truncation, rows lost in tokenisation, chat-template pitfalls,
degenerate tokenization and unknown tokens (data.token_health, which training also enforces), and
data.max_length against the model's context length.

Each check turns the `TokenScan` of token_scan.py (every row tokenised as training does, with the
raw chat-template renders looked at on the way) or the sampled `TokenHealth` into a verdict.
"""

from __future__ import annotations

import math

from dpokit.data.token_health import ADVICE as TOKEN_ADVICE
from dpokit.data.token_health import (
    TokenHealth,
    context_length_problem,
    model_context_length,
    token_health_problems,
)
from dpokit.doctor.report import CheckResult
from dpokit.doctor.token_scan import TokenScan
from dpokit.config import DoctorConfig


def _p99(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * (len(ordered) - 1) + 0.5))] if ordered else 0


def truncation_check(
    scan: TokenScan, max_length: int, max_prompt_length: int, thresholds: DoctorConfig, context: int | None = None
) -> CheckResult:
    """How many prompts and completions training would cut, and limits that would keep 99% of rows whole,
    never past the model's `context` (its max_position_embeddings, when known)."""
    n = max(scan.rows, 1)
    stats = scan.stats
    shares = {
        "prompt": stats.prompts_truncated / n,
        "chosen": stats.chosen_truncated / n,
        "rejected": stats.rejected_truncated / n,
    }
    full = [p + max(c, r) for p, c, r in zip(scan.prompt_lengths, scan.chosen_lengths, scan.rejected_lengths)]
    numbers = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "share": shares,
        "p99_prompt_tokens": _p99(scan.prompt_lengths),
        "p99_total_tokens": _p99(full),
        "context_length": context,
    }
    summary = (
        f"at data.max_length={max_length}, data.max_prompt_length={max_prompt_length}: prompts cut in "
        f"{shares['prompt']:.1%} of pairs, chosen in {shares['chosen']:.1%}, rejected in {shares['rejected']:.1%} "
        f"(p99 tokens: prompt {numbers['p99_prompt_tokens']}, prompt + longer completion {numbers['p99_total_tokens']})"
    )
    worst = max(shares.values())
    if worst <= thresholds.truncation_warn_share:
        return CheckResult("truncation", "ok", summary, numbers=numbers)
    whole_prompt, whole_total = max(numbers["p99_prompt_tokens"], 1), max(numbers["p99_total_tokens"], 2)
    if context is None or whole_total <= context:
        fix = (
            f"To keep 99% of rows whole set data.max_prompt_length={whole_prompt} and data.max_length={whole_total}, "
            "or filter out the longest rows."
        )
    else:  # positions past the context were never trained (the context_length check fails there): cap at it
        fix = (
            f"Keeping 99% of rows whole would take {whole_total} tokens, past the model's context of {context} "
            f"tokens: set data.max_length={context} and data.max_prompt_length={min(whole_prompt, context // 2)}, and "
            "filter out the longest rows (or shorten them) so fewer are cut."
        )
    return CheckResult(
        "truncation",
        "fail" if worst > thresholds.truncation_fail_share else "warn",
        summary,
        "A cut completion loses its EOS (the model is not taught to stop there) and compares partial answers; a cut "
        f"prompt loses its oldest turns. {fix}",
        numbers,
    )


def template_prefix_check(scan: TokenScan) -> CheckResult:
    """Conversational rows: the prompt render (with generation prompt) must prefix the full render exactly."""
    if not scan.conversational:
        return CheckResult(
            "template_prefix", "skip", "no conversational rows (plain-text rows do not use the chat template)"
        )
    numbers = {"conversational_rows": scan.conversational, "not_prefix": len(scan.not_prefix)}
    summary = f"{len(scan.not_prefix)} of {scan.conversational} conversational rows: prompt is not a token prefix of prompt + completion"
    if not scan.not_prefix:
        return CheckResult("template_prefix", "ok", summary, numbers=numbers)
    return CheckResult(
        "template_prefix",
        "fail",
        f"{summary}; first divergence {scan.divergence}",
        "Prompt and completion are split where the two renders diverge, so the prompt tokens after that point are "
        "trained as if the model wrote them, and the completion starts in the wrong place. The chat template renders "
        "the conversation differently with add_generation_prompt=True than with the assistant turn (templates that add, "
        "drop or reformat text depending on the last message do this): use the model's own template or fix this one.",
        numbers,
        scan.not_prefix[:5],
    )


def special_tokens_check(scan: TokenScan) -> CheckResult:
    """BOS twice at the start of a prompt, or the end-of-turn token twice at the end of a completion."""
    numbers = {"doubled_bos": len(scan.doubled_bos), "doubled_eos": len(scan.doubled_eos), "rows": scan.rows}
    summary = (
        f"BOS doubled at the start of {len(scan.doubled_bos)} of {scan.rows} prompts; EOS/end-of-turn doubled "
        f"at the end of {len(scan.doubled_eos)} completions"
    )
    if not scan.doubled_bos and not scan.doubled_eos:
        return CheckResult("special_tokens", "ok", summary, numbers=numbers)
    advice = []
    if scan.doubled_bos:
        advice.append(
            "The prompt text already starts with the BOS token and the tokenizer (or chat template) adds "
            "another: remove BOS from the prompt text (typical of prompts pre-rendered with a chat template)."
        )
    if scan.doubled_eos:
        advice.append(
            "The completion text already ends with the end-of-turn token and the chat template (or dpokit, "
            "for plain-text rows, which appends EOS) adds another: the model learns to emit it twice. "
            "Strip the end-of-turn token from the completion text."
        )
    return CheckResult(
        "special_tokens", "warn", summary, " ".join(advice), numbers, (scan.doubled_bos + scan.doubled_eos)[:5]
    )


def completion_end_check(scan: TokenScan) -> CheckResult:
    """Every untruncated completion should end with EOS or an end-of-turn token, or the model never learns to stop."""
    completions = 2 * scan.rows
    numbers = {"missing_end": len(scan.missing_eos), "completions": completions}
    summary = f"{len(scan.missing_eos)} of {completions} completions do not end with EOS or an end-of-turn token (before truncation)"
    if not scan.missing_eos:
        return CheckResult("completion_end", "ok", summary, numbers=numbers)
    return CheckResult(
        "completion_end",
        "warn",
        summary,
        "Without an end-of-turn token at the end of the completion the model is never taught to stop and learns to "
        "run on. Use a chat template that closes the assistant turn (with EOS or its end-of-turn token) when it is the "
        "last message.",
        numbers,
        scan.missing_eos[:5],
    )


def token_health_check(health: TokenHealth) -> CheckResult:
    """Training's degenerate-tokenization refusal (data.token_health), as a check: empty prompts, EOS-only
    completions, lossy round trips. The unknown-token rate has its own check (`unknown_tokens_check`)."""
    numbers = health.to_dict()
    problems = token_health_problems(health, max_unknown_rate=math.inf)
    summary = (
        f"{health.tokenizer_class} on {health.rows} sampled rows: "
        f"{health.share('empty_prompts', 'prompts_with_text'):.0%} prompts with 0 tokens, "
        f"{health.share('eos_only_completions', 'completions_with_text'):.0%} completions only EOS/special, "
        f"{health.share('lossy_texts', 'round_trip_texts'):.0%} texts lost in decode(encode(text))"
    )
    if not problems:
        return CheckResult("token_health", "ok", summary, numbers=numbers)
    return CheckResult(
        "token_health",
        "fail",
        f"{'; '.join(problems)} ({summary})",
        f"Training refuses this data: the model would train on empty prompts and bare EOS tokens "
        f"(log-probs 0, gradient 0). The tokenizer loaded as {health.tokenizer_class}: {TOKEN_ADVICE}.",
        numbers,
    )


def unknown_tokens_check(health: TokenHealth, fail_rate: float, warn_rate: float) -> CheckResult:
    """Share of the sampled tokens that are the tokenizer's unknown token: text the model cannot see.
    fail_rate: data.max_unknown_token_rate (where training refuses); warn_rate: doctor.unknown_token_warn_rate."""
    rate = health.unknown_token_rate
    numbers = {
        "tokenizer_class": health.tokenizer_class,
        "unknown_tokens": health.unknown_tokens,
        "tokens": health.tokens,
        "unknown_token_rate": rate,
    }
    summary = f"{rate:.1%} of {health.tokens} tokens in {health.rows} sampled rows are the unknown token"
    if rate <= min(warn_rate, fail_rate):
        return CheckResult("unknown_tokens", "ok", summary, numbers=numbers)
    return CheckResult(
        "unknown_tokens",
        "fail" if rate > fail_rate else "warn",
        summary,
        f"Every unknown token stands for text the model never sees, and all of them look the same to the loss. "
        f"The tokenizer's vocabulary does not cover this data's language or characters (above "
        f"{fail_rate:.1%}, data.max_unknown_token_rate, training refuses to start): use the tokenizer of a model made "
        "for this text.",
        numbers,
    )


def context_length_check(max_length: int, model_config) -> CheckResult:
    """data.max_length against the model's context length (max_position_embeddings, n_positions, ...)."""
    if hasattr(model_config, "get_text_config"):  # a vision-language config keeps its context in its text config
        model_config = model_config.get_text_config()
    context = model_context_length(model_config)
    numbers = {"max_length": max_length, "context_length": context}
    if context is None:
        return CheckResult("context_length", "skip", "the model's config names no context length", numbers=numbers)
    problem = context_length_problem(max_length, model_config)
    summary = f"data.max_length={max_length}, model context {context} tokens"
    if problem is None:
        return CheckResult("context_length", "ok", summary, numbers=numbers)
    return CheckResult(
        "context_length",
        "fail",
        problem,
        "Positions past the model's context were never trained: the log-probs there are not the "
        f"model's. Set data.max_length <= {context} (and data.max_prompt_length below it).",
        numbers,
    )
