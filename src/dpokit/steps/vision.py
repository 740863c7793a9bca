"""The paired step for rows with images (data.vision: true): the plain [chosen; rejected] step plus pixel values.

The fast paths (speed.packing, speed.prefix_sharing, speed.chunked_logps) lay several sequences
into one row or run the backbone on embeddings they build themselves; a vision-language model
merges image features into its input embeddings at the image tokens of each row, which those
layouts do not carry. So image rows always run the plain step (data/vision.collate_vision_pairs:
padded rows, each row's pixel values, the vision tower run for chosen and for rejected), and a
config that asks for a fast path gets one printed line saying so. speed.ref_cache still works:
the reference's log-probs are computed here with the same plain forward and stored with the
images in the cache's fingerprint (ref_cache/fingerprint.py).
"""

from __future__ import annotations

import torch

from dpokit.config import Config
from dpokit.data.vision import collate_vision_pairs, prepare_vision_data, vision_inputs
from dpokit.logprobs import token_logps
from dpokit.losses import shared_prefix_logps
from dpokit.models import load_processor
from dpokit.steps.paired import PairedStep


class VisionPairedStep(PairedStep):
    """PairedStep on image rows: the processor tokenises, batches carry pixel values and may carry cached reference log-probs."""

    reads_reference_cache = True

    def prepare(self, cfg: Config, tokenizer):
        speed = cfg.speed
        fast = [name for name in ("packing", "prefix_sharing", "chunked_logps") if getattr(speed, name)]
        if fast:
            print(
                f"[dpokit] data.vision: speed.{', speed.'.join(fast)} do not support image rows: the plain paired step "
                "runs (padded rows, each row's pixel values)"
                + ("; speed.ref_cache still applies" if speed.ref_cache else ""),
                flush=True,
            )
        return prepare_vision_data(cfg, load_processor(cfg))

    def collate(self, pairs: list, pad_token_id: int) -> dict:
        return collate_vision_pairs(pairs, pad_token_id)


@torch.no_grad()
def vision_reference_logps(
    model, pairs: list, pad_token_id: int, order: list[int], batch_size: int, device, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """(N, 4) reference log-probs (chosen, rejected, chosen_shared, rejected_shared) of image pairs, plain forward.

    `model` is already the reference (adapters off); batches are `order[s : s + batch_size]`, as the cache build
    takes them, and this process computes batches rank, rank + world, ... (the other rows stay 0).
    """
    out = torch.zeros(len(pairs), 4, dtype=torch.float32)
    for b, start in enumerate(range(0, len(order), batch_size)):
        if b % world != rank:
            continue
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_vision_pairs([pairs[i] for i in idx], pad_token_id).items()}
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **vision_inputs(batch),
            use_cache=False,
        ).logits
        tok_logps, mask = token_logps(logits, batch["labels"])
        logps, shared = tok_logps.sum(-1), shared_prefix_logps(tok_logps, mask)
        n = len(idx)
        out[idx] = torch.stack([logps[:n], logps[n:], shared[:n], shared[n:]], dim=1).float().cpu()
    return out
