"""A pairwise judge from a local HF causal LM, so the suites run with no API.

The judge is shown the prompt and two responses and asked to answer "A" or "B"; it does not generate. The
preference is read off its next-token distribution: p(A) = softmax(logit_A, logit_B)[A] at the answer position
(the same reading as the option-letter scoring of multiple-choice evaluations). Position bias (a model that
says "A" more often whatever it reads) is cancelled by asking both orders and averaging:

    compare(x, a, b) = ( p_A(x, a, b) + p_B(x, b, a) ) / 2

so compare(x, a, b) + compare(x, b, a) = 1 for every model, and compare(x, a, a) = 1/2. A strong instruction-tuned
model makes this a judge; a tiny one gives values near 1/2, which is what it knows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpokit.model_source import ModelLoadError
from dpokit.online.judges import SYSTEM_PROMPT
from dpokit.online.prompts import Prompt
from dpokit.online.suites.answers import render_chat


# The judge's answer is read from the next token, so it is asked for one letter: not for a verdict in the reply
# grammar of online/judge_grammar.py ("[[A]]"), whose first token would be the brackets. It writes no reply to read.
LETTER_TEMPLATE = (
    "Which response is the better reply to the prompt? Answer with one letter: A or B.\n\n"
    "[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}"
)


class LocalJudgeError(ModelLoadError):
    """The judge's tokenizer cannot tell the answers "A" and "B" apart."""


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)


def letter_ids(tokenizer, plain: bool) -> tuple[int, int]:
    """The token ids of the answers A and B right after the answer prompt (" A" after a plain "Assistant:")."""
    ids = []
    for letter in ("A", "B"):
        tokens = tokenizer.encode((" " if plain else "") + letter, add_special_tokens=False)
        if not tokens:
            raise LocalJudgeError(f"the judge's tokenizer turns {letter!r} into no tokens")
        ids.append(tokens[0])
    if ids[0] == ids[1] or tokenizer.unk_token_id in ids:
        raise LocalJudgeError(
            f"the judge's tokenizer does not have distinct tokens for 'A' and 'B' (got ids {ids}); "
            "use a judge model with an ordinary vocabulary"
        )
    return ids[0], ids[1]


class LocalPairwiseJudge:
    """compare(prompts, a, b) -> per item the probability-weighted preference for a in [0, 1], both orders averaged."""

    def __init__(
        self,
        model,
        tokenizer,
        template: str = LETTER_TEMPLATE,
        system: str = SYSTEM_PROMPT,
        batch_size: int = 8,
        name: str = "local judge",
    ):
        self.model, self.tokenizer, self.template, self.system, self.batch_size = (
            model,
            tokenizer,
            template,
            system,
            batch_size,
        )
        self.plain = not getattr(tokenizer, "chat_template", None)
        self.a_id, self.b_id = letter_ids(tokenizer, self.plain)
        self.name = name

    def _texts(self, prompts, first, second) -> list[str]:
        def messages(p, a, b):
            return [
                {"role": "system", "content": self.system},
                {"role": "user", "content": self.template.format(prompt=_prompt_text(p), a=a, b=b)},
            ]

        return [render_chat(messages(p, a, b), self.tokenizer) for p, a, b in zip(prompts, first, second)]

    @torch.no_grad()
    def prob_a(self, prompts, first, second) -> torch.Tensor:
        """p(answer A) / (p(A) + p(B)) for each item as shown (first response as A): (N,)."""
        texts = self._texts(prompts, first, second)
        device = next(self.model.parameters()).device
        side, pad = self.tokenizer.padding_side, self.tokenizer.pad_token
        self.tokenizer.padding_side = "left"  # the answer position is the last one of every row
        if pad is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
                ).to(device)
                # Positions count real tokens only, so a left-padded row reads as it would alone.
                positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
                logits = self.model(**enc, position_ids=positions).logits[:, -1, :].float()  # (B, V) at the answer
                out.append(torch.softmax(logits[:, [self.a_id, self.b_id]], dim=-1)[:, 0].cpu())
        finally:
            self.tokenizer.padding_side, self.tokenizer.pad_token = side, pad
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def compare(self, prompts: Sequence, completions_a: Sequence[str], completions_b: Sequence[str]) -> list[float]:
        if not len(prompts) == len(completions_a) == len(completions_b):
            raise ValueError(f"{len(prompts)} prompts, {len(completions_a)} and {len(completions_b)} completions")
        ab = self.prob_a(prompts, completions_a, completions_b)
        ba = self.prob_a(prompts, completions_b, completions_a)
        return ((ab + (1.0 - ba)) / 2).tolist()
