"""Is the tokenised data made of real tokens? Refuse degenerate tokenization before any compute.

A tokenizer that does not match its vocabulary (e.g. a config.json saying model_type qwen2 beside
a word-level tokenizer.json: transformers picks Qwen2Tokenizer, which ignores that vocabulary)
does not raise; it quietly turns every prompt into 0 tokens and every completion into EOS alone.
Training on that runs "fine" with log-probs 0 and gradient norm 0. The same check serves the
paired, unpaired (KTO) and SFT preparations and the doctor:

    rows = paired_rows(examples, pairs)               # or completion_rows(examples, tokenized)
    health = measure_token_health(rows, tokenizer)    # counts over a seeded sample of rows
    token_health_problems(health, cfg.data.max_unknown_token_rate)  # ["92% of prompts tokenised to 0 tokens", ...]

`context_length_problem` compares data.max_length with the model's own context length.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from dpokit.data.records import DataError, PreferenceExample

# A sample is enough: a mismatched tokenizer damages every row alike, and a few hundred rows
# give each share below to within a few percent while costing one encode/decode per text.
SAMPLE_ROWS = 256
# "Most" rows: a real tokenizer gives 0% empty prompts and 0% EOS-only completions (any text
# yields at least one content token), so only a broken one gets anywhere near half.
MAX_EMPTY_PROMPT_SHARE = 0.5
MAX_EOS_ONLY_SHARE = 0.5
# The unknown-token limit is data.max_unknown_token_rate (0.10): a tokenizer made for the data's
# language gives ~0% <unk> (byte-level BPEs cannot produce it at all) and a few rare symbols stay
# under 1%; one token in ten unknown means the model is trained on placeholders instead of text
# (the demo word tokenizer gives 73% on English).
# Round trip decode(encode(text)): real tokenizers are lossless or close (normalisers drop
# accents or case; casefolded, whitespace-free characters are compared). A text "loses most of
# itself" when under half its characters come back; failing needs most texts to do so. Texts
# that encode to the unknown token are left to the unknown-token rate.
MIN_KEPT_CHARACTERS = 0.5
MAX_LOSSY_TEXT_SHARE = 0.5
_ROUND_TRIP_CHARS = 2000  # characters of each text encoded for the round trip (bounded cost)


@dataclass
class HealthRow:
    """One tokenised row beside its raw text: what the model will see next to what the user wrote."""

    prompt_text: str
    prompt_ids: list[int]
    completions: list[tuple[str, list[int]]]  # (raw completion text, completion ids as trained)


@dataclass
class TokenHealth:
    """Counts over the sampled rows; `token_health_problems` turns them into findings."""

    tokenizer_class: str
    rows: int = 0
    prompts_with_text: int = 0
    empty_prompts: int = 0  # of prompts_with_text: tokenised to 0 tokens
    completions_with_text: int = 0
    eos_only_completions: int = 0  # of completions_with_text: only special tokens (EOS, end of turn)
    tokens: int = 0
    unknown_tokens: int = 0  # ids equal to the tokenizer's unk id (0 when it has none)
    round_trip_texts: int = 0
    lossy_texts: int = 0  # round trip kept under MIN_KEPT_CHARACTERS of the text

    def share(self, part: str, whole: str) -> float:
        return getattr(self, part) / getattr(self, whole) if getattr(self, whole) else 0.0

    @property
    def unknown_token_rate(self) -> float:
        return self.share("unknown_tokens", "tokens")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unknown_token_rate": self.unknown_token_rate}


def text_of(value: str | list) -> str:
    """A prompt or completion as plain text: the string, or the messages' contents joined by newlines."""
    if isinstance(value, str):
        return value
    return "\n".join(str(message.get("content") or "") for message in value)


def paired_rows(examples: list[PreferenceExample], pairs: list) -> list[HealthRow]:
    """TokenizedPair rows matched to their PreferenceExample by source ("file:row") and every_turn turn."""
    by_source = {(ex.source, ex.turn): ex for ex in examples}
    rows = []
    for pair in pairs:
        ex = by_source.get((pair.source, pair.turn))
        if ex is not None:
            rows.append(
                HealthRow(
                    text_of(ex.prompt),
                    pair.prompt_ids,
                    [(text_of(ex.chosen), pair.chosen_ids), (text_of(ex.rejected), pair.rejected_ids)],
                )
            )
    return rows


def completion_rows(examples: list, tokenized: list) -> list[HealthRow]:
    """TokenizedCompletion rows (KTO, SFT) matched to their UnpairedExample by (source, label).

    `examples` may be the unpaired loader's groups (lists of examples) or plain examples; a
    split pair gives two examples with one source, told apart by their label.
    """
    flat = [ex for item in examples for ex in (item if isinstance(item, list) else [item])]
    by_key = {(ex.source, ex.label, ex.turn): ex for ex in flat}
    rows = []
    for row in tokenized:
        ex = by_key.get((row.source, row.label, row.turn))
        if ex is not None:
            rows.append(HealthRow(text_of(ex.prompt), row.prompt_ids, [(text_of(ex.completion), row.completion_ids)]))
    return rows


def _sample(rows: list[HealthRow], size: int) -> list[HealthRow]:
    return rows if len(rows) <= size else random.Random(0).sample(rows, size)


def kept_share(original: str, round_trip: str) -> float:
    """Share of `original`'s characters (casefolded, whitespace ignored) found again in `round_trip`."""
    want = Counter(c for c in original.casefold() if not c.isspace())
    if not want:
        return 1.0
    got = Counter(c for c in round_trip.casefold() if not c.isspace())
    return sum(min(n, got[c]) for c, n in want.items()) / sum(want.values())


def _round_trip(tokenizer, text: str, unk_id: int | None) -> str | None:
    """decode(encode(text)), or None when the encoding holds the unknown token: that text's loss is the
    unknown-token rate's to judge (data.max_unknown_token_rate), so the two findings never double-count it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if unk_id is not None and unk_id in ids:
        return None
    return tokenizer.decode(ids, skip_special_tokens=True)


def measure_token_health(rows: list[HealthRow], tokenizer, sample_size: int = SAMPLE_ROWS) -> TokenHealth:
    """Count empty prompts, EOS-only completions, unknown tokens and lossy round trips in a seeded sample."""
    health = TokenHealth(type(tokenizer).__name__)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        special.add(tokenizer.eos_token_id)
    special.discard(unk_id)  # <unk> is counted as unknown, not as "only EOS"
    for row in _sample(rows, sample_size):
        health.rows += 1
        texts = [row.prompt_text] + [text for text, _ in row.completions]
        if row.prompt_text.strip():
            health.prompts_with_text += 1
            health.empty_prompts += not row.prompt_ids
        for text, ids in row.completions:
            if text.strip():
                health.completions_with_text += 1
                health.eos_only_completions += all(i in special for i in ids)
        for ids in [row.prompt_ids] + [ids for _, ids in row.completions]:
            health.tokens += len(ids)
            if unk_id is not None:
                health.unknown_tokens += sum(i == unk_id for i in ids)
        for text in (t[:_ROUND_TRIP_CHARS] for t in texts if t.strip()):
            back = _round_trip(tokenizer, text, unk_id)
            if back is not None:
                health.round_trip_texts += 1
                health.lossy_texts += kept_share(text, back) < MIN_KEPT_CHARACTERS
    return health


def token_health_problems(health: TokenHealth, max_unknown_rate: float) -> list[str]:
    """What is degenerate about the sampled tokenisation, each as a short phrase with its numbers."""
    problems = []
    empty = health.share("empty_prompts", "prompts_with_text")
    if empty > MAX_EMPTY_PROMPT_SHARE:
        problems.append(f"{empty:.0%} of prompts tokenised to 0 tokens")
    eos_only = health.share("eos_only_completions", "completions_with_text")
    if eos_only > MAX_EOS_ONLY_SHARE:
        problems.append(f"{eos_only:.0%} of completions tokenised to EOS/special tokens only")
    if health.unknown_token_rate > max_unknown_rate:
        problems.append(
            f"{health.unknown_token_rate:.1%} of tokens are the unknown token (data.max_unknown_token_rate="
            f"{max_unknown_rate:g}; raise it only if those tokens are expected)"
        )
    lossy = health.share("lossy_texts", "round_trip_texts")
    if lossy > MAX_LOSSY_TEXT_SHARE:
        problems.append(f"decode(encode(text)) loses most of the text in {lossy:.0%} of texts")
    return problems


ADVICE = (
    "check the tokenizer folder: tokenizer.json / tokenizer_config.json must be the tokenizer the model was "
    "trained with, and config.json's model_type must match it (a mismatch makes transformers load another "
    "tokenizer class that ignores the vocabulary)"
)


def check_token_health(rows: list[HealthRow], tokenizer, data_path: str, max_unknown_rate: float) -> dict[str, Any]:
    """Raise DataError (one line) when the tokenisation is degenerate; else the measured health as a dict.
    max_unknown_rate: data.max_unknown_token_rate."""
    health = measure_token_health(rows, tokenizer)
    problems = token_health_problems(health, max_unknown_rate)
    if problems:
        raise DataError(
            f"degenerate tokenization with the tokenizer loaded as {health.tokenizer_class}: "
            f"{'; '.join(problems)} (sample of {health.rows} rows); {ADVICE}",
            path=data_path,
        )
    return health.to_dict()


def check_completion_health(
    examples: list, tokenized: list, tokenizer, data_path: str, max_unknown_rate: float
) -> dict[str, Any]:
    """`check_token_health` for TokenizedCompletion rows (KTO, SFT)."""
    return check_token_health(completion_rows(examples, tokenized), tokenizer, data_path, max_unknown_rate)


# Model config fields that hold the context length, by architecture family.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context_length(model_config) -> int | None:
    """The model's context length in tokens from its config (first of CONTEXT_FIELDS set), or None."""
    for name in CONTEXT_FIELDS:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def longest_sequence(examples) -> int:
    """Tokens of the longest row the model will see: prompt + the longer completion (pairs) or prompt + completion."""
    longest = 0
    for e in examples:
        completions = [
            getattr(e, name) for name in ("chosen_ids", "rejected_ids", "completion_ids") if hasattr(e, name)
        ]
        longest = max(longest, len(e.prompt_ids) + max((len(c) for c in completions), default=0))
    return longest


def context_length_problem(max_length: int, model_config, longest: int | None = None) -> str | None:
    """Why data.max_length does not fit the model's context, or None when it fits (or is unknown).

    Positions past the context have no trained position embedding (or rotary range): the
    sequences still run (or a learned-position model raises IndexError), but what the model
    computes there is not what it learned. longest: the longest tokenised row, when known; then
    only rows that really pass the context are a problem.
    """
    if hasattr(model_config, "get_text_config"):  # a vision-language config keeps its context in its text config
        model_config = model_config.get_text_config()
    context = model_context_length(model_config)
    if context is None or max_length <= context or (longest is not None and longest <= context):
        return None
    field = next(n for n in CONTEXT_FIELDS if getattr(model_config, n, None) == context)
    seen = f"the longest row is {longest} tokens and " if longest is not None else ""
    return (
        f"data.max_length={max_length} exceeds the model's context length of {context} tokens ({field} in its "
        f"config): {seen}positions past it were never trained; set data.max_length <= {context}"
    )
