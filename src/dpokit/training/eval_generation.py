"""Eval-time sampling: how long are the policy's own completions now?

The length detector (`length_drift` in diagnostics.py) needs the length of what
the policy *generates*: the lengths in the preference data never change, so
they cannot show length hacking (completions growing) or the truncated answers
of a forgetting policy (completions shrinking). With `train.eval_generate=N`
the trainer samples N completions at every evaluation, for the same eval
prompts with the same seed each time, so a change in `eval_mean_length` is the
policy changing, not the prompts or the dice.
"""

from __future__ import annotations

from typing import Sequence

from dpokit.generation import sample


def eval_prompts(examples: Sequence, tokenizer, n: int) -> list[str]:
    """The first `n` distinct prompts of the eval split, as text `sample` re-tokenises.

    `examples` are tokenised pairs or completions (anything with `prompt_ids`). The ids are
    decoded with their special tokens kept, so a chat-templated prompt (role markers, the
    generation prompt) comes back as the text that tokenises to it.
    """
    seen: set[tuple[int, ...]] = set()
    prompts: list[str] = []
    for example in examples:
        key = tuple(example.prompt_ids)
        if key in seen:  # KTO splits a pair into two examples with one prompt
            continue
        seen.add(key)
        prompts.append(tokenizer.decode(example.prompt_ids, skip_special_tokens=False))
        if len(prompts) == n:
            break
    return prompts


def generation_metrics(
    policy,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    seed: int,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Sample `n` completions (the prompts in order, repeated if there are fewer than n) and measure them.

    Returns eval_mean_length: mean completion tokens, EOS excluded (the detector's metric), and
    eval_finished_share: the share that ended with EOS within max_new_tokens (a policy that
    rambles hits the cap, which also caps its length: a falling share explains a length plateau).
    Temperature 1 samples the policy's own distribution. {} when n <= 0 or there are no prompts.
    The policy's train/eval mode and the global RNG are left as they were (`generation.sample`).
    """
    if n <= 0 or not prompts:
        return {}
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    samples = sample(
        policy, tokenizer, chosen, num_samples=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
    lengths = [len(s.completion_ids) - int(s.finished) for s in samples]
    return {
        "eval_mean_length": sum(lengths) / len(samples),
        "eval_finished_share": sum(s.finished for s in samples) / len(samples),
    }
