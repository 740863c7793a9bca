"""Preference rows with images -> tokenised pairs that carry their prompt's pixel values (data.vision: true).

A row is a chat prompt whose messages hold `{"type": "image"}` content parts, an `images` column
(one image or a list: a path, raw bytes, or a datasets Image dict {"bytes", "path"}), and
chosen/rejected answers (text or assistant messages). The model's processor (AutoProcessor,
loaded by models.load_processor) renders the chat template and expands each image part into the
model's image tokens; pixel_values (and image_grid_thw, image_sizes where the model uses them)
come from the same call.

Image tokens are never cut: left truncation of the prompt (data.max_prompt_length) may only
remove tokens before the first image token (and the special token right before it, a
<|vision_start|>-style opener). A row that would lose image tokens is skipped and counted
("prompt truncation would cut image tokens"), or with data.strict raises a DataError naming it.
Completions never hold images, so cutting them from the right is as for text rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from dpokit.data.collate import attach_cached_reference, collate_pairs
from dpokit.data.fields import check_completion
from dpokit.data.prepare import PreparedData, load_train_and_eval, split_summary
from dpokit.data.records import DataError, PreferenceExample, SkipReport
from dpokit.data.rows import RowSkip, cap_rows, convert_rows, no_usable_rows_message
from dpokit.data.token_health import check_token_health, paired_rows
from dpokit.data.tokenization import TokenizationStats, TokenizedPair
from dpokit.inputs import RowPathError, check_image_bytes, read_row_image

# Processor outputs with one entry per image (concatenated along dim 0 in a batch), as the models read them.
VISION_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")
TEXT_KEYS = ("input_ids", "attention_mask")
IMAGE_TRUNCATION = "prompt truncation would cut image tokens"


@dataclass
class VisionExample(PreferenceExample):
    images: list[bytes] = field(default_factory=list)  # the raw image files, in the order of the prompt's image parts


@dataclass(repr=False)
class VisionPair(TokenizedPair):
    """A tokenised pair whose prompt holds images: the processor's per-image tensors, computed once per pair."""

    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. pixel_values (n_images, 3, H, W)
    image_digest: str = ""  # blake2b of the image bytes and the processor's tensors (the reference cache's key)
    reference: Optional[tuple] = None  # cached reference log-probs (ref_cache), as CachedPair holds them

    def with_reference(self, values: tuple) -> "VisionPair":
        return dataclasses.replace(self, reference=values)

    def __repr__(self) -> str:
        # what identifies the training data (checkpoint fingerprints): the token ids and the images, not tensor reprs
        return (
            repr(TokenizedPair(self.prompt_ids, self.chosen_ids, self.rejected_ids, self.source))[:-1]
            + f", images={self.image_digest!r})"
        )


# --- rows -------------------------------------------------------------------------------------


def row_image_bytes(value: Any, folder: str | None, image_roots: tuple[str, ...] = ()) -> bytes:
    """An image's bytes; a path is the input gateway's: inside the data file's folder (or data.image_root),
    a regular file under the size limit, a readable image under the pixel limit. Anything else is a
    counted skip with its reason, never a read of /dev/zero or of ./red.png in the current directory."""
    if isinstance(value, dict):  # a datasets Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        try:
            check_image_bytes(bytes(value))
        except RowPathError as error:
            raise RowSkip(error.reason, "images") from None
        return bytes(value)
    if isinstance(value, str) and value:
        try:
            return read_row_image(value, folder, image_roots)
        except RowPathError as error:
            raise RowSkip(error.reason, "images") from None
    raise RowSkip(f"images must hold paths or bytes, got {type(value).__name__}", "images")


def _parts(content: Any, field_name: str) -> tuple[Any, int]:
    """A message's content (a string, or a list of text/image parts) and its number of image parts."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list) or not content:
        raise RowSkip(f"{field_name} has a message without text content", field_name)
    n_images = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            n_images += 1
        elif kind != "text" or not isinstance(part.get("text"), str):
            raise RowSkip(f"{field_name} has a content part that is neither {{'type': 'image'}} nor text", field_name)
    return [
        {"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]} for p in content
    ], n_images


def _messages(value: Any, field_name: str) -> tuple[list[dict], int]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}], 0
    if not isinstance(value, list) or not value:
        raise RowSkip(f"{field_name} must be a string or a non-empty list of messages", field_name)
    out, n_images = [], 0
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RowSkip(f"{field_name} has a message without a role", field_name)
        content, n = _parts(message.get("content"), field_name)
        out.append({"role": message["role"], "content": content})
        n_images += n
    return out, n_images


def _text_only(messages: list[dict]) -> list[dict]:
    """fields.check_completion reads string contents; a text-part list is joined for the check."""
    return [
        {
            **m,
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(p.get("text", "") for p in m["content"]),
        }
        for m in messages
    ]


def vision_example(row: dict, where: str, folder: str | None, image_roots: tuple[str, ...] = ()) -> VisionExample:
    """One row -> VisionExample; RowSkip (counted by convert_rows) for what cannot be used."""
    for name in ("prompt", "chosen", "rejected"):
        if row.get(name) is None:
            raise RowSkip(f"{name} is missing", name)
    if isinstance(row["prompt"], str):
        raise RowSkip(
            "data.vision rows need a prompt of chat messages (with {'type': 'image'} parts for their images)", "prompt"
        )
    prompt, n_parts = _messages(row["prompt"], "prompt")
    chosen, n_chosen = _messages(row["chosen"], "chosen")
    rejected, n_rejected = _messages(row["rejected"], "rejected")
    if n_chosen or n_rejected:
        raise RowSkip(
            "image parts in chosen/rejected are not supported (images belong to the prompt)",
            "chosen" if n_chosen else "rejected",
        )
    check_completion(_text_only(chosen), "chosen")
    check_completion(_text_only(rejected), "rejected")
    raw = row.get("images")
    raw = [] if raw is None else raw if isinstance(raw, list) else [raw]
    if len(raw) != n_parts:
        raise RowSkip(f"the row has {len(raw)} images but its prompt has {n_parts} image parts", "images")
    images = [row_image_bytes(value, folder, image_roots) for value in raw]
    return VisionExample(prompt=prompt, chosen=chosen, rejected=rejected, source=where, images=images)


def load_vision_preferences(
    path: str,
    split: str = "train",
    strict: bool = False,
    max_rows: int | None = None,
    image_roots: tuple[str, ...] = (),
) -> tuple[list[VisionExample], SkipReport]:
    """Every row of `path` as a VisionExample; image paths are relative to the data file's folder."""
    # Relative image paths mean: beside the data file, inside a dataset folder; rows from the hub have no folder,
    # so only data.image_root is readable for them (never the current directory: the dataset is untrusted).
    local = os.path.abspath(os.path.expanduser(path))
    folder = local if os.path.isdir(local) else os.path.dirname(local) if os.path.lexists(local) else None
    examples, report = convert_rows(
        path, split, lambda row, where: ("vision", vision_example(row, where, folder, image_roots)), strict, max_rows
    )
    if not examples:
        raise DataError(no_usable_rows_message(report), path)
    return examples, report


# --- tokenisation -------------------------------------------------------------------------------


def _open(images: list[bytes]):
    from PIL import Image

    return [Image.open(io.BytesIO(raw)).convert("RGB") for raw in images]


def _encode(processor, text: str, images) -> dict:
    encoded = processor(text=[text], images=images or None, return_tensors="pt")
    unknown = sorted(set(encoded) - set(VISION_KEYS) - set(TEXT_KEYS))
    if unknown:  # a per-token input we do not pass on would give the model other inputs than it expects
        raise DataError(
            f"the processor returns {', '.join(unknown)}, which dpokit does not pass to the model; "
            f"supported inputs: {', '.join(TEXT_KEYS + VISION_KEYS)}"
        )
    return encoded


def image_token_start(prompt_ids: list[int], processor) -> Optional[int]:
    """Index of the first token truncation must keep: the first image token, or the special token just before it."""
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None:
        image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if image_id not in prompt_ids:
        return None
    start = prompt_ids.index(image_id)
    if start > 0 and prompt_ids[start - 1] in set(processor.tokenizer.all_special_ids):
        start -= 1
    return start


def _digest(images: list[bytes], vision: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for raw in images:
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    for key in sorted(vision):
        t = vision[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def render_vision_ids(example: VisionExample, processor) -> tuple[list[int], list[int], list[int], dict]:
    """(prompt ids with image tokens expanded, chosen ids, rejected ids, the prompt's per-image tensors)."""
    images = _open(example.images)
    prompt_text = processor.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
    encoded = _encode(processor, prompt_text, images)
    prompt = encoded["input_ids"][0].tolist()
    full = []
    for completion in (example.chosen, example.rejected):
        text = processor.apply_chat_template(example.prompt + completion, tokenize=False)
        full.append(_encode(processor, text, images)["input_ids"][0].tolist())
    n = min(_common_prefix(prompt, full[0]), _common_prefix(prompt, full[1]))
    vision = {k: encoded[k] for k in VISION_KEYS if k in encoded}
    return prompt[:n], full[0][n:], full[1][n:], vision


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_vision_pairs(
    examples: list[VisionExample],
    processor,
    max_length: int,
    max_prompt_length: int,
    report: SkipReport,
    strict: bool = False,
) -> tuple[list[VisionPair], TokenizationStats]:
    """tokenize_pairs for image rows: the same truncation rules, except that image tokens are never cut."""
    stats, out = TokenizationStats(), []
    for ex in examples:
        prompt, chosen, rejected, vision = render_vision_ids(ex, processor)
        if len(prompt) > max_prompt_length:
            cut = len(prompt) - max_prompt_length
            start = image_token_start(prompt, processor)
            if start is not None and cut > start:
                if strict:
                    raise DataError(
                        f"{IMAGE_TRUNCATION}: the prompt is {len(prompt)} tokens, its image tokens start at "
                        f"{start}, data.max_prompt_length={max_prompt_length}",
                        path=ex.source,
                    )
                report.skip(IMAGE_TRUNCATION, f"{ex.source} (prompt: {len(prompt)} tokens, image tokens from {start})")
                report.rows_used -= 1
                continue
            prompt = prompt[cut:]
            stats.prompts_truncated += 1
        room = max_length - len(prompt)
        if len(chosen) > room:
            chosen, stats.chosen_truncated = chosen[: max(room, 0)], stats.chosen_truncated + 1
        if len(rejected) > room:
            rejected, stats.rejected_truncated = rejected[: max(room, 0)], stats.rejected_truncated + 1
        if not chosen or not rejected:
            which = "chosen" if not chosen else "rejected"
            report.skip(f"empty {which} completion after tokenisation/truncation", f"{ex.source} ({which})")
            report.rows_used -= 1
            continue
        for name, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            stats.lengths[name].append(len(ids))
        out.append(
            VisionPair(prompt, chosen, rejected, ex.source, vision=vision, image_digest=_digest(ex.images, vision))
        )
    return out, stats


# --- batches ----------------------------------------------------------------------------------


def collate_vision_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """collate_pairs' (2B, T) [chosen; rejected] batch plus each row's images, concatenated in row order.

    The rows b and B + b both hold pair b's prompt, hence its image tokens, so pair b's pixel values
    appear twice (chosen rows' images, then rejected rows'): the vision tower runs twice per pair.
    Cached reference log-probs (ref_cache) ride along as ref_logps / ref_shared_logps (2B,).
    """
    batch = collate_pairs(pairs, pad_token_id)
    keys = {k for p in pairs for k in getattr(p, "vision", {})}
    for key in sorted(keys):
        per_row = [p.vision[key] for p in pairs if key in getattr(p, "vision", {})]
        batch[key] = torch.cat(per_row + per_row, dim=0)
    return attach_cached_reference(batch, pairs)


def vision_inputs(batch: dict) -> dict:
    """The image inputs of a batch, as keyword arguments of the model's forward ({} for text batches)."""
    return {k: batch[k] for k in VISION_KEYS if k in batch}


def images_digest(pairs: list) -> Optional[str]:
    """One hash over every pair's images (None when no pair has any): the reference cache's `images` part."""
    digests = [getattr(p, "image_digest", "") for p in pairs]
    if not any(digests):
        return None
    return hashlib.blake2b("|".join(digests).encode(), digest_size=20).hexdigest()


# --- preparation ------------------------------------------------------------------------------


def prepare_vision_data(cfg, processor):
    """prepare_data for image rows: load, hold out eval prompts, tokenise with the processor, summarise."""

    def load(path: str, split: str, cfg):
        examples, report = load_vision_preferences(
            path, split, cfg.data.strict, cfg.data.max_rows, tuple(cfg.data.image_root)
        )
        return cap_rows(examples, report, path, cfg.data.max_rows), report

    train_examples, train_report, eval_examples, eval_report = load_train_and_eval(cfg, load)
    d = cfg.data
    train, train_stats = tokenize_vision_pairs(
        train_examples, processor, d.max_length, d.max_prompt_length, train_report, d.strict
    )
    evals, eval_stats = tokenize_vision_pairs(
        eval_examples, processor, d.max_length, d.max_prompt_length, eval_report, d.strict
    )
    summary = {
        "train": split_summary(train_report, train_stats, len(train)),
        "eval": split_summary(eval_report, eval_stats, len(evals)),
    }
    # the token-health sample reads text: the prompts' text parts (image tokens are the processor's, never unknown)
    texts = [dataclasses.replace(ex, prompt=_text_only(ex.prompt)) for ex in train_examples]
    summary["train"]["token_health"] = check_token_health(
        paired_rows(texts, train), processor.tokenizer, d.path, d.max_unknown_token_rate
    )
    for split, pairs in (("train", train), ("eval", evals)):
        summary[split]["images"] = sum(_images_in(p) for p in pairs)
    return PreparedData(train, evals, summary)


def _images_in(pair: VisionPair) -> int:
    grid = pair.vision.get("image_grid_thw", pair.vision.get("pixel_values"))
    return 0 if grid is None else int(grid.shape[0])
