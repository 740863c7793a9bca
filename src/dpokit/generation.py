"""Batched, seeded sampling of text completions from a causal LM.

Used wherever dpokit needs the policy's own outputs: evaluation (reward, KL to
the reference, samples to read) and rejection sampling for preference data. It
keeps the token ids with the text, so log-probs of exactly what was sampled can
be computed later without re-tokenising (which need not round-trip).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt: str
    completion: str  # decoded without special tokens; prompt + completion is the full text
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, no padding, including the EOS if one was generated
    finished: bool  # ended with EOS within max_new_tokens


@contextmanager
def _sampling_state(model, tokenizer):
    """Eval mode and left padding for the duration of sampling; both restored afterwards.

    Left padding keeps every prompt's last token at the right edge, so new tokens
    are appended right after the prompt for every row of a batch.
    """
    was_training, padding_side, pad_token = model.training, tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"
    if pad_token is None:  # e.g. Llama tokenizers: pad with EOS; the attention mask hides it anyway
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None


def _decode_completion(tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> str:
    # Decoding the completion alone can lose the separator between prompt and
    # completion (a word-level decoder joins words, it does not know a space came
    # before the first one), so decode the whole text and strip the decoded prompt.
    full = tokenizer.decode(prompt_ids + completion_ids, skip_special_tokens=True)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt) :]
    return tokenizer.decode(completion_ids, skip_special_tokens=True)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    on_batch=None,
) -> list[Sample]:
    """num_samples completions per prompt, prompt-major (all samples of prompts[0] first).

    temperature=0 decodes greedily. Otherwise tokens are sampled from the
    temperature-scaled distribution with nucleus filtering at top_p and no top-k
    cut (so temperature 1, top_p 1 samples the model's own distribution, which a
    Monte-Carlo KL estimate needs). The same seed and arguments give the same
    samples; the global torch RNG state is left as it was.
    Prompts are tokenised as they are (add_special_tokens=False).
    on_batch: called with the number of completions of each finished batch (a progress bar's update).
    """
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if not prompts:
        return []
    device = next(model.parameters()).device
    expanded = [p for p in prompts for _ in range(num_samples)]
    if temperature == 0:
        options = dict(do_sample=False)
    else:
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    results: list[Sample] = []
    fork_devices = [device] if device.type == "cuda" else []
    with _sampling_state(model, tokenizer), torch.random.fork_rng(devices=fork_devices):
        for start in range(0, len(expanded), batch_size):
            batch = expanded[start : start + batch_size]
            # One seed per batch: each batch's samples do not depend on how long earlier batches ran.
            torch.manual_seed(seed * 1_000_003 + start)
            enc = tokenizer(batch, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id, **options
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
            for row, prompt in enumerate(batch):
                prompt_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                completion_ids = new_tokens[row]
                # After a row's EOS, generate fills the row with padding until the batch ends.
                finished = eos_id in completion_ids
                if finished:
                    completion_ids = completion_ids[: completion_ids.index(eos_id) + 1]
                text = _decode_completion(tokenizer, prompt_ids, completion_ids)
                results.append(Sample(prompt, text, prompt_ids, completion_ids, finished))
            if on_batch is not None:
                on_batch(len(batch))
    return results
