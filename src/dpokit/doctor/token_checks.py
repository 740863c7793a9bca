"""Checks that need the tokenizer: truncation, rows lost in tokenisation, chat-template pitfalls,
degenerate tokenization and unknown tokens (data.token_health, which training also enforces), and
data.max_length against the model's context length.

Training tokenises with `render_ids` / `tokenize_pairs`; the doctor calls the
same functions, so what it reports is what training will see. The template
checks look at the raw renders those functions hide: `render_ids` splits prompt
from completion at the longest common prefix, which silently absorbs a prompt
that does not render as a prefix of the full conversation.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from dpokit.data.records import PreferenceExample, SkipReport
from dpokit.data.token_health import ADVICE as TOKEN_ADVICE
from dpokit.data.token_health import (
    TokenHealth,
    context_length_problem,
    model_context_length,
    token_health_problems,
)
from dpokit.data.tokenization import EmptyRender, TokenizationStats, TokenizedPair, render_ids, template_kwargs, tokenize_pairs
from dpokit.data.tokenization import encoded_ids  # one place knows transformers 4 vs 5 return types
from dpokit.doctor.report import CheckResult
from dpokit.config import DoctorConfig

# End-of-turn tokens of common chat templates; those in a tokenizer's vocabulary count as "the completion ended".
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>")


class RecentRenders:
    """A tokenizer proxy remembering its last few results.

    The doctor's own template checks, `render_ids` and `tokenize_pairs` render
    the same row with the same arguments; a small cache makes that one chat
    template render per text instead of three, without holding a whole dataset.
    """

    def __init__(self, tokenizer, size: int = 16) -> None:
        self._tokenizer = tokenizer
        self._size = size
        self._cache: OrderedDict = OrderedDict()

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def _remember(self, key, compute):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._cache[key] = compute()
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return value

    def __call__(self, text, **kwargs):
        key = ("text", json.dumps(text), json.dumps(kwargs, sort_keys=True, default=str))
        return self._remember(key, lambda: self._tokenizer(text, **kwargs))

    def apply_chat_template(self, messages, **kwargs):
        key = ("chat", json.dumps(messages, sort_keys=True, default=str), json.dumps(kwargs, sort_keys=True, default=str))
        return self._remember(key, lambda: self._tokenizer.apply_chat_template(messages, **kwargs))


@dataclass
class TokenScan:
    """What tokenising every row showed; the check functions below turn it into verdicts."""

    pairs: list[TokenizedPair] = field(default_factory=list)  # as training would get them (truncated)
    stats: TokenizationStats = field(default_factory=TokenizationStats)
    skips: SkipReport = field(default_factory=SkipReport)
    rows: int = 0
    chosen_lengths: list[int] = field(default_factory=list)  # untruncated completion tokens, one per row
    rejected_lengths: list[int] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    conversational: int = 0
    not_prefix: list[str] = field(default_factory=list)  # sources
    divergence: str = ""  # where the first non-prefix row diverges, in tokens
    doubled_bos: list[str] = field(default_factory=list)
    doubled_eos: list[str] = field(default_factory=list)
    missing_eos: list[str] = field(default_factory=list)


class _TokenInspector:
    """Per-tokenizer facts the checks need: end-of-turn ids, and which ids are only whitespace."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.end_ids = {vocab[token] for token in END_OF_TURN_TOKENS if token in vocab}
        if tokenizer.eos_token_id is not None:
            self.end_ids.add(tokenizer.eos_token_id)
        self.bos_id = tokenizer.bos_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        self._blank: dict[int, bool] = {}

    def is_blank(self, token_id: int) -> bool:
        # ChatML ends a turn with "<|im_end|>\n": the newline after the end-of-turn token must not hide it.
        if token_id not in self._blank:
            text = self.tokenizer.decode([token_id])
            self._blank[token_id] = token_id not in self.special_ids and not text.strip()
        return self._blank[token_id]

    def tail(self, ids: list[int], n: int = 2) -> list[int]:
        """The last `n` ids that are not whitespace-only."""
        kept = [i for i in ids[-(n + 8) :] if not self.is_blank(i)]
        return kept[-n:]

    def describe(self, ids: list[int]) -> str:
        return " ".join(self.tokenizer.convert_ids_to_tokens(ids)) or "(end)"


def scan_tokens(examples: list[PreferenceExample], tokenizer, max_length: int, max_prompt_length: int) -> TokenScan:
    """Tokenise every row as training does, and look at the raw chat-template renders on the way."""
    scan = TokenScan()
    cached = RecentRenders(tokenizer)
    inspector = _TokenInspector(tokenizer)
    for ex in examples:
        scan.rows += 1
        try:
            prompt, chosen, rejected = render_ids(ex, cached)
        except EmptyRender:  # counted in scan.skips below, as training counts it; the completion_render check reports it
            tokenize_pairs([ex], cached, max_length, max_prompt_length, scan.skips)
            continue
        scan.prompt_lengths.append(len(prompt))
        scan.chosen_lengths.append(len(chosen))
        scan.rejected_lengths.append(len(rejected))
        if ex.conversational:
            scan.conversational += 1
            _check_prefix(ex, cached, inspector, scan)
        if inspector.bos_id is not None and prompt[:2] == [inspector.bos_id] * 2:
            scan.doubled_bos.append(ex.source)
        for completion, which in ((chosen, "chosen"), (rejected, "rejected")):
            last = inspector.tail(completion)
            if not last or last[-1] not in inspector.end_ids:
                scan.missing_eos.append(f"{ex.source} ({which})")
            elif len(last) == 2 and last[0] == last[1]:
                scan.doubled_eos.append(f"{ex.source} ({which})")
        pairs, stats = tokenize_pairs([ex], cached, max_length, max_prompt_length, scan.skips)
        scan.pairs.extend(pairs)
        _add_stats(scan.stats, stats)
    return scan


def _check_prefix(ex: PreferenceExample, tokenizer, inspector: _TokenInspector, scan: TokenScan) -> None:
    """The prompt rendered with the generation prompt must be an exact token prefix of prompt + completion."""
    extra = template_kwargs(ex)
    prompt = encoded_ids(tokenizer.apply_chat_template(ex.prompt, tokenize=True, add_generation_prompt=True, **extra))
    for completion in (ex.chosen, ex.rejected):
        full = encoded_ids(tokenizer.apply_chat_template(ex.prompt + completion, tokenize=True, **extra))
        if full[: len(prompt)] == prompt:
            continue
        scan.not_prefix.append(ex.source)
        if not scan.divergence:
            at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
            scan.divergence = (f"at token {at} of {ex.source}: the prompt render has "
                               f"'{inspector.describe(prompt[at:at + 4])}', the full conversation "
                               f"'{inspector.describe(full[at:at + 4])}'")
        return


def _add_stats(total: TokenizationStats, one: TokenizationStats) -> None:
    total.prompts_truncated += one.prompts_truncated
    total.chosen_truncated += one.chosen_truncated
    total.rejected_truncated += one.rejected_truncated
    for name, values in one.lengths.items():
        total.lengths[name].extend(values)


# --- verdicts ---------------------------------------------------------------------------------


def _p99(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * (len(ordered) - 1) + 0.5))] if ordered else 0


def truncation_check(scan: TokenScan, max_length: int, max_prompt_length: int, thresholds: DoctorConfig,
                     context: int | None = None) -> CheckResult:
    """How many prompts and completions training would cut, and limits that would keep 99% of rows whole,
    never past the model's `context` (its max_position_embeddings, when known)."""
    n = max(scan.rows, 1)
    stats = scan.stats
    shares = {"prompt": stats.prompts_truncated / n, "chosen": stats.chosen_truncated / n, "rejected": stats.rejected_truncated / n}
    full = [p + max(c, r) for p, c, r in zip(scan.prompt_lengths, scan.chosen_lengths, scan.rejected_lengths)]
    numbers = {"max_length": max_length, "max_prompt_length": max_prompt_length, "share": shares,
               "p99_prompt_tokens": _p99(scan.prompt_lengths), "p99_total_tokens": _p99(full), "context_length": context}
    summary = (f"at data.max_length={max_length}, data.max_prompt_length={max_prompt_length}: prompts cut in "
               f"{shares['prompt']:.1%} of pairs, chosen in {shares['chosen']:.1%}, rejected in {shares['rejected']:.1%} "
               f"(p99 tokens: prompt {numbers['p99_prompt_tokens']}, prompt + longer completion {numbers['p99_total_tokens']})")
    worst = max(shares.values())
    if worst <= thresholds.truncation_warn_share:
        return CheckResult("truncation", "ok", summary, numbers=numbers)
    whole_prompt, whole_total = max(numbers["p99_prompt_tokens"], 1), max(numbers["p99_total_tokens"], 2)
    if context is None or whole_total <= context:
        fix = (f"To keep 99% of rows whole set data.max_prompt_length={whole_prompt} and data.max_length={whole_total}, "
               "or filter out the longest rows.")
    else:  # positions past the context were never trained (the context_length check fails there): cap at it
        fix = (f"Keeping 99% of rows whole would take {whole_total} tokens, past the model's context of {context} "
               f"tokens: set data.max_length={context} and data.max_prompt_length={min(whole_prompt, context // 2)}, and "
               "filter out the longest rows (or shorten them) so fewer are cut.")
    return CheckResult(
        "truncation", "fail" if worst > thresholds.truncation_fail_share else "warn", summary,
        "A cut completion loses its EOS (the model is not taught to stop there) and compares partial answers; a cut "
        f"prompt loses its oldest turns. {fix}", numbers,
    )


def template_prefix_check(scan: TokenScan) -> CheckResult:
    """Conversational rows: the prompt render (with generation prompt) must prefix the full render exactly."""
    if not scan.conversational:
        return CheckResult("template_prefix", "skip", "no conversational rows (plain-text rows do not use the chat template)")
    numbers = {"conversational_rows": scan.conversational, "not_prefix": len(scan.not_prefix)}
    summary = f"{len(scan.not_prefix)} of {scan.conversational} conversational rows: prompt is not a token prefix of prompt + completion"
    if not scan.not_prefix:
        return CheckResult("template_prefix", "ok", summary, numbers=numbers)
    return CheckResult(
        "template_prefix", "fail", f"{summary}; first divergence {scan.divergence}",
        "Prompt and completion are split where the two renders diverge, so the prompt tokens after that point are "
        "trained as if the model wrote them, and the completion starts in the wrong place. The chat template renders "
        "the conversation differently with add_generation_prompt=True than with the assistant turn (templates that add, "
        "drop or reformat text depending on the last message do this): use the model's own template or fix this one.",
        numbers, scan.not_prefix[:5],
    )


def special_tokens_check(scan: TokenScan) -> CheckResult:
    """BOS twice at the start of a prompt, or the end-of-turn token twice at the end of a completion."""
    numbers = {"doubled_bos": len(scan.doubled_bos), "doubled_eos": len(scan.doubled_eos), "rows": scan.rows}
    summary = (f"BOS doubled at the start of {len(scan.doubled_bos)} of {scan.rows} prompts; EOS/end-of-turn doubled "
               f"at the end of {len(scan.doubled_eos)} completions")
    if not scan.doubled_bos and not scan.doubled_eos:
        return CheckResult("special_tokens", "ok", summary, numbers=numbers)
    advice = []
    if scan.doubled_bos:
        advice.append("The prompt text already starts with the BOS token and the tokenizer (or chat template) adds "
                      "another: remove BOS from the prompt text (typical of prompts pre-rendered with a chat template).")
    if scan.doubled_eos:
        advice.append("The completion text already ends with the end-of-turn token and the chat template (or dpokit, "
                      "for plain-text rows, which appends EOS) adds another: the model learns to emit it twice. "
                      "Strip the end-of-turn token from the completion text.")
    return CheckResult("special_tokens", "warn", summary, " ".join(advice), numbers, (scan.doubled_bos + scan.doubled_eos)[:5])


def completion_end_check(scan: TokenScan) -> CheckResult:
    """Every untruncated completion should end with EOS or an end-of-turn token, or the model never learns to stop."""
    completions = 2 * scan.rows
    numbers = {"missing_end": len(scan.missing_eos), "completions": completions}
    summary = f"{len(scan.missing_eos)} of {completions} completions do not end with EOS or an end-of-turn token (before truncation)"
    if not scan.missing_eos:
        return CheckResult("completion_end", "ok", summary, numbers=numbers)
    return CheckResult(
        "completion_end", "warn", summary,
        "Without an end-of-turn token at the end of the completion the model is never taught to stop and learns to "
        "run on. Use a chat template that closes the assistant turn (with EOS or its end-of-turn token) when it is the "
        "last message.", numbers, scan.missing_eos[:5],
    )


def token_health_check(health: TokenHealth) -> CheckResult:
    """Training's degenerate-tokenization refusal (data.token_health), as a check: empty prompts, EOS-only
    completions, lossy round trips. The unknown-token rate has its own check (`unknown_tokens_check`)."""
    numbers = health.to_dict()
    problems = token_health_problems(health, max_unknown_rate=math.inf)
    summary = (f"{health.tokenizer_class} on {health.rows} sampled rows: "
               f"{health.share('empty_prompts', 'prompts_with_text'):.0%} prompts with 0 tokens, "
               f"{health.share('eos_only_completions', 'completions_with_text'):.0%} completions only EOS/special, "
               f"{health.share('lossy_texts', 'round_trip_texts'):.0%} texts lost in decode(encode(text))")
    if not problems:
        return CheckResult("token_health", "ok", summary, numbers=numbers)
    return CheckResult("token_health", "fail", f"{'; '.join(problems)} ({summary})",
                       f"Training refuses this data: the model would train on empty prompts and bare EOS tokens "
                       f"(log-probs 0, gradient 0). The tokenizer loaded as {health.tokenizer_class}: {TOKEN_ADVICE}.",
                       numbers)


def unknown_tokens_check(health: TokenHealth, fail_rate: float, warn_rate: float) -> CheckResult:
    """Share of the sampled tokens that are the tokenizer's unknown token: text the model cannot see.
    fail_rate: data.max_unknown_token_rate (where training refuses); warn_rate: doctor.unknown_token_warn_rate."""
    rate = health.unknown_token_rate
    numbers = {"tokenizer_class": health.tokenizer_class, "unknown_tokens": health.unknown_tokens,
               "tokens": health.tokens, "unknown_token_rate": rate}
    summary = f"{rate:.1%} of {health.tokens} tokens in {health.rows} sampled rows are the unknown token"
    if rate <= min(warn_rate, fail_rate):
        return CheckResult("unknown_tokens", "ok", summary, numbers=numbers)
    return CheckResult(
        "unknown_tokens", "fail" if rate > fail_rate else "warn", summary,
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
    return CheckResult("context_length", "fail", problem,
                       "Positions past the model's context were never trained: the log-probs there are not the "
                       f"model's. Set data.max_length <= {context} (and data.max_prompt_length below it).", numbers)
