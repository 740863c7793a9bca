"""The one small interface every objective implements; the training loop calls nothing else.

A `Step` says how its examples are prepared from config.data, batched, counted and scored:

    prepare(cfg, tokenizer)        -> PreparedData (train and eval examples, the data summary)
    collate(examples, pad_id)      -> a batch of tensors
    count(batch)                   -> the batch's share of a step's loss denominator (pairs, examples, tokens)
    weight(example)                -> one example's share of it (count of a batch = sum of its examples' weights)
    tokens(example)                -> input tokens, as TRL's running `num_tokens` counts them
    forward(policy, reference, batch, cfg, with_reference) -> (LossOutput, {metric: (n,) tensor})
                                   (the paired steps also take beta_for: beta-DPO's per-batch beta, loss.beta_schedule)
    needs_reference(cfg)           -> whether a reference model (or its cached log-probs) is needed

Two properties let the setup adapt a step without asking what it is: `plain()` is the step
without the fast paths (for models outside transformers' attention interface), and
`reads_reference_cache` says its batches may carry the reference's cached log-probs.
"""

from __future__ import annotations

from dpokit.config import Config
from dpokit.losses import needs_reference


class Step:
    name = "dpo"  # the progress bar's label
    reads_reference_cache = False  # batches may carry cached reference log-probs (ref_cache), no reference model then

    def prepare(self, cfg: Config, tokenizer):
        raise NotImplementedError

    def collate(self, examples: list, pad_token_id: int) -> dict:
        raise NotImplementedError

    def count(self, batch: dict) -> int:
        raise NotImplementedError

    def weight(self, example) -> float:
        return 1  # a step's loss is the mean over its examples

    def tokens(self, example) -> int:
        raise NotImplementedError

    def forward(self, policy, reference, batch: dict, cfg: Config, with_reference: bool) -> tuple:
        raise NotImplementedError

    def needs_reference(self, cfg: Config) -> bool:
        return needs_reference(cfg.loss)  # reference-free losses build and run no reference

    @property
    def is_fast(self) -> bool:
        return self.plain() is not self

    def plain(self) -> "Step":
        """This step without the fast paths (padding-free rows, chunked LM head); itself when it has none."""
        return self
