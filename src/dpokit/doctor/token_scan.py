"""Tokenise every row as training will, and record what the checks in token_checks judge.

Training tokenises with `render_ids` / `tokenize_pairs`; the doctor calls the
same functions, so what it reports is what training will see. The scan also
looks at the raw renders those functions hide: `render_ids` splits prompt
from completion at the longest common prefix, which silently absorbs a prompt
that does not render as a prefix of the full conversation.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field

from dpokit.data.records import PreferenceExample, SkipReport
from dpokit.data.tokenization import (
    EmptyRender,
    TokenizationStats,
    TokenizedPair,
    render_ids,
    template_kwargs,
    tokenize_pairs,
)
from dpokit.data.tokenization import encoded_ids  # one place knows transformers 4 vs 5 return types

# End-of-turn tokens of common chat templates; those in a tokenizer's vocabulary count as "the completion ended".
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
)


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
        key = (
            "chat",
            json.dumps(messages, sort_keys=True, default=str),
            json.dumps(kwargs, sort_keys=True, default=str),
        )
        return self._remember(key, lambda: self._tokenizer.apply_chat_template(messages, **kwargs))


@dataclass
class TokenScan:
    """What tokenising every row showed; the checks in token_checks turn it into verdicts."""

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
        except (
            EmptyRender
        ):  # counted in scan.skips below, as training counts it; the completion_render check reports it
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
            scan.divergence = (
                f"at token {at} of {ex.source}: the prompt render has "
                f"'{inspector.describe(prompt[at : at + 4])}', the full conversation "
                f"'{inspector.describe(full[at : at + 4])}'"
            )
        return


def _add_stats(total: TokenizationStats, one: TokenizationStats) -> None:
    total.prompts_truncated += one.prompts_truncated
    total.chosen_truncated += one.chosen_truncated
    total.rejected_truncated += one.rejected_truncated
    for name, values in one.lengths.items():
        total.lengths[name].extend(values)
