"""The suites' answers: a conversation so far -> the model's next turn (chat template, or a plain transcript)."""

from __future__ import annotations

from collections.abc import Sequence

from dpokit.generation import Sample, sample


def render_chat(messages: Sequence[dict], tokenizer) -> str:
    """The text the model continues to answer the last user turn.

    With a chat template: the template with the generation prompt. Without one (plain language models such
    as a base model): a "User: ... / Assistant: ..." transcript ending in "Assistant:".
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def answer(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[Sample]:
    """One answer per conversation (greedy by default, as IFEval and MT-Bench generate), in order."""
    texts = [render_chat(c, tokenizer) for c in conversations]
    return sample(
        model,
        tokenizer,
        texts,
        num_samples=1,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
