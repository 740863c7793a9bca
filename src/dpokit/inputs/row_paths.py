"""Paths named inside data rows (images): resolved against the data file's folder, never the current directory.

A dataset, local or from the hub, is untrusted input: a row saying `"images": ["../../etc/passwd"]` or
`"/dev/zero"` must not make dpokit read that file. A row's path is resolved against the folder of the
data file that holds it; after symlinks are resolved it must lie inside that folder or inside one of
the roots the user allowed (`data.image_root`). An image is then checked like every input (regular
file, size limit) and its header is read for the pixel count before any pixel is decoded, so a
decompression bomb is refused cheaply. Every refusal is a `RowPathError`, which the row loop counts
as a skip with its reason.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

from dpokit.inputs.gateway import MAX_IMAGE_PIXELS, InputError, is_inside, read_bytes


class RowPathError(InputError):
    """A path or file named in a row cannot be used; `reason` is the short skip reason."""


def resolve_row_path(value: str, base_dir: str | None, allowed_roots: Iterable[str] = ()) -> str:
    """The real path of `value` (relative to `base_dir`), if it lies in base_dir or an allowed root."""
    if "\x00" in value:
        raise RowPathError("image path holds a NUL byte", value.replace("\x00", "\\0"))
    # base_dir None: the rows came from the hub or a datasets loader, which has no folder of its own
    # for a relative path to mean; only the allowed roots are readable then.
    base = os.path.realpath(base_dir) if base_dir is not None else None
    roots = ([base] if base else []) + [os.path.realpath(os.path.expanduser(r)) for r in allowed_roots]
    if base is None and not os.path.isabs(value):
        raise RowPathError(
            "a relative image path in a dataset that is not a local file has no folder to be "
            "relative to (give absolute paths under data.image_root, or image bytes)",
            value,
        )
    joined = value if os.path.isabs(value) else os.path.join(base, value)  # base is set here (checked above)
    real = os.path.realpath(joined)
    if not any(is_inside(real, root) for root in roots):
        raise RowPathError("image path is outside the data folder (set data.image_root to allow another folder)", value)
    return real


def read_row_image(value: str, base_dir: str | None, allowed_roots: Iterable[str] = ()) -> bytes:
    """The bytes of an image file named in a row, after the path, file and header checks."""
    real = resolve_row_path(value, base_dir, allowed_roots)
    try:
        raw = read_bytes(real, "image")
    except InputError as error:
        raise RowPathError(f"image {error.reason}", value) from None
    check_image_bytes(raw, value)
    return raw


def check_image_bytes(raw: bytes, where: str = "") -> None:
    """RowPathError unless `raw` is an image whose header says at most MAX_IMAGE_PIXELS pixels.

    Reads the header only (PIL opens lazily); the full decode happens later, at tokenisation, and
    `verify()` catches a truncated or corrupt body here, while a bad row is still a counted skip.
    """
    try:
        from PIL import Image
    except ImportError:
        raise InputError(
            "data.vision needs pillow to read images: pip install 'dpokit[vision]' (or pip install pillow)"
        ) from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise RowPathError(
                    f"image is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} pixel limit "
                    "(a decompression bomb, or a scan far larger than a model's input)",
                    where,
                )
            image.verify()
    except RowPathError:
        raise
    except Image.DecompressionBombError:
        raise RowPathError(
            f"image is over the {MAX_IMAGE_PIXELS:,} pixel limit (a decompression bomb)", where
        ) from None
    except Exception as error:  # PIL raises many types for a non-image or a damaged one
        raise RowPathError(f"not a readable image ({type(error).__name__})", where) from None
