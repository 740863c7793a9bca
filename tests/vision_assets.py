"""A tiny local LLaVA and a tiny image set shared by the image-row tests (test_vlm_rows, test_vlm_train)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from PIL import Image

from dpokit.tiny_vision import build_tiny_llava_dir
from tiny_assets import session_folder

WORDS = "user assistant what colour is the square it is red blue green a picture of"
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}


@functools.lru_cache(maxsize=None)
def tiny_llava_dir(seed: int = 0) -> Path:
    """A saved tiny LLaVA folder (model, processor, tokenizer), built once per test session and seed."""
    return build_tiny_llava_dir(session_folder("dpokit-llava-") / "model", WORDS, seed=seed)


def write_images(folder: Path) -> dict[str, Path]:
    """One small PNG per colour (20x20; the processor resizes to 16x16)."""
    paths = {}
    for name, rgb in COLOURS.items():
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (20, 20), rgb).save(paths[name])
    return paths


def image_prompt(text: str = " what colour is the square", before: str = "") -> list[dict]:
    parts = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def colour_rows(n: int) -> list[dict]:
    """The colour of the image is preferred over the next colour: a preference only the image can tell."""
    names = list(COLOURS)
    rows = []
    for i in range(n):
        name, other = names[i % 3], names[(i + 1) % 3]
        rows.append(
            {
                "images": [f"{name}.png"],
                "prompt": image_prompt(),
                "chosen": [{"role": "assistant", "content": f"it is {name}"}],
                "rejected": [{"role": "assistant", "content": f"it is {other}"}],
            }
        )
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
