"""Before/after metrics of a policy in the demo world, as the DPO paper reports them.

The paper's sentiment experiment plots reward against KL(policy || reference):
alignment is a higher reward bought at a small, measured divergence from the
SFT model. `evaluate_policy` measures both from the policy's own samples, plus
the held-out preference accuracy of DPO's implicit reward, the length and the
fluency of the samples (so a reward gained by writing word salad or by writing
longer shows up in the table rather than hiding behind the reward).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from dpokit.demo import world
from dpokit.online.eval_metrics import progress_bar
from dpokit.online.evaluation import kl_to_reference, preference_accuracy  # general pieces, kept importable from here
from dpokit.generation import sample

MAX_NEW_TOKENS = 24  # reviews are at most 14 words + EOS; room to see a policy that rambles
N_EXAMPLES = 3  # prompts whose first sample is shown under the table, the same prompts before and after


def _load_pairs(pairs: Sequence[Mapping[str, str]] | str | Path) -> list[Mapping[str, str]]:
    if isinstance(pairs, (str, Path)):
        with open(pairs) as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(pairs)


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str],
    eval_pairs: Sequence[Mapping[str, str]] | str | Path,
    num_samples: int = 4,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: str | None = None,
) -> dict:
    """Sample the policy at temperature 1 on `prompts` and score it against the reference.

    Returns positive_share (mean true sentiment: 1 positive, 0 negative, 0.5 tie),
    mean_length (completion tokens, EOS excluded: words in this language),
    kl_to_reference (nats), preference_accuracy (on eval_pairs, rows or a jsonl
    path), well_formed_share (finished with EOS and grammatical), num_samples (total
    samples scored) and examples ([prompt, completion] of the first sample of each of the
    first N_EXAMPLES prompts).
    progress: a name for progress bars on stderr (sampling, KL, held-out pairs); None: silent.
    Evaluate two models with different seeds: with the same seed both draw from the same random
    numbers, and wherever DPO left the next-token distribution nearly as it was they pick the
    same words, so the "before" and "after" samples of a prompt come out identical.
    """
    pairs = _load_pairs(eval_pairs)
    shown = progress is not None
    with progress_bar(len(prompts) * num_samples, f"[demo] {progress}: sampling", "sample", shown) as bar:
        samples = sample(
            policy,
            tokenizer,
            list(prompts),
            num_samples=num_samples,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            seed=seed,
            on_batch=bar.update,
        )
    with progress_bar(len(samples), f"[demo] {progress}: KL", "sample", shown) as bar:
        kl = kl_to_reference(policy, reference, samples, tokenizer.pad_token_id, progress=bar)
    with progress_bar(2 * len(pairs), f"[demo] {progress}: held-out pairs", "seq", shown) as bar:
        accuracy = preference_accuracy(policy, reference, tokenizer, pairs, progress=bar)
    n = max(1, len(samples))
    lengths = [len(s.completion_ids) - (1 if s.finished else 0) for s in samples]
    examples = [[s.prompt, s.completion] for s in samples[:: max(1, num_samples)][:N_EXAMPLES]]
    return {
        "positive_share": sum(world.sentiment(s.completion) for s in samples) / n,
        "mean_length": sum(lengths) / n,
        "kl_to_reference": kl,
        "preference_accuracy": accuracy,
        "well_formed_share": sum(s.finished and world.is_well_formed(s.completion) for s in samples) / n,
        "num_samples": len(samples),
        "examples": examples,
    }


# (key, row label, format) for each metric row of the table.
_ROWS = [
    ("positive_share", "positive share (true reward)", "{:.1%}"),
    ("kl_to_reference", "KL(policy || SFT), nats [1]", "{:.2f}"),
    ("preference_accuracy", "held-out preference accuracy", "{:.1%}"),
    ("well_formed_share", "well-formed share", "{:.1%}"),
    ("mean_length", "mean length (words)", "{:.1f}"),
    ("num_samples", "samples scored", "{:d}"),
]


def kl_note(num_samples: int) -> str:
    """What the table's KL is, so it is not mistaken for the training metric kl/chosen of the run's report."""
    return (
        f"[1] estimated from the {num_samples} policy samples: E[log pi - log ref] by the k3 estimator, mean of (r - 1) - log r,\n"
        "    r = ref/pi per completion (unbiased, never negative). Not the report's kl/chosen, which is the exact\n"
        "    next-token KL summed along the training pairs' chosen completions."
    )


def format_table(before: dict, after: dict) -> str:
    """A plain-text before/after table (rows: metrics; columns: SFT, DPO), then samples of the same prompts."""
    headers = ("metric", "SFT (before)", "DPO (after)")
    rows = [
        (label, fmt.format(before[key]), fmt.format(after[key]))
        for key, label, fmt in _ROWS
        if key in before and key in after
    ]
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(3)]

    def line(cells) -> str:
        return f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]:>{widths[2]}}"

    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    if "kl_to_reference" in after:
        out += [kl_note(after.get("num_samples", 0))]
    out += ["", "Samples of the same prompts, SFT (before) and DPO (after):"]
    for (prompt, sft), (_, dpo) in zip(before.get("examples", []), after.get("examples", [])):
        out += [f"  {prompt} ...", f"    SFT: ...{sft}  [{_label(sft)}]", f"    DPO: ...{dpo}  [{_label(dpo)}]"]
    return "\n".join(out)


def _label(text: str) -> str:
    return {1.0: "positive", 0.0: "negative"}.get(world.sentiment(text), "neutral")
