"""Checkpoint checksums: manifest.json, written inside a checkpoint before it is renamed into place, checked before a resume.

    manifest.json   {"format": 1, "files": {"model.safetensors": {"bytes": 97200, "blake2b": "<40 hex>"}, ...}}

A file's `blake2b` is blake2b-20 over the blake2b-20 digests of its 256 MiB pieces, in order: the
pieces hash in parallel threads (hashlib releases the GIL), so the tens of GB of a large checkpoint
are read back once, right after being written and fsynced (from the page cache), in seconds.

Checkpoints written before manifests existed get a structural check only (`damage` says which):
every safetensors file must be as long as its header says, every JSON file must parse. A flipped
bit in such a checkpoint goes unnoticed; a truncated file does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"
FORMAT = 1
_PIECE = 256 << 20  # hashed by one thread
_READ = 4 << 20  # read at a time: at most threads x 4 MiB of memory


def write_manifest(folder: Path) -> None:
    """Hash every file under `folder` (the manifest excepted) into folder/manifest.json."""
    names = _files(folder)
    digests = _digests(folder, names)
    files = {name: {"bytes": (folder / name).stat().st_size, "blake2b": digests[name]} for name in names}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def damage(folder: Path) -> Optional[str]:
    """What is wrong with a checkpoint's files, naming the first bad one ("model.safetensors: checksum mismatch"); None if nothing.

    With a manifest: every listed file must be there, at its size and checksum, and no other file.
    Without one (a checkpoint older than manifests): the structural check of the module docstring.
    """
    folder = Path(folder)
    if not has_manifest(folder):
        return _structural_damage(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {str(name): (int(entry["bytes"]), str(entry["blake2b"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST}: unreadable ({type(e).__name__})"
    present = set(_files(folder))
    for name, (size, _) in sorted(expected.items()):
        if name not in present:
            return f"{name}: missing"
        actual = (folder / name).stat().st_size
        if actual != size:
            return f"{name}: {actual:,} bytes, {size:,} when written ({'truncated' if actual < size else 'grown'})"
    extra = sorted(present - set(expected))
    if extra:
        return f"{extra[0]}: not in {MANIFEST}"
    digests = _digests(folder, sorted(expected))
    bad = [name for name, (_, digest) in sorted(expected.items()) if digests[name] != digest]
    if bad:
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        return f"{bad[0]}: checksum mismatch{more}"
    return None


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    pieces = [(name, start) for name in names for start in range(0, (folder / name).stat().st_size, _PIECE)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(pieces)))) as pool:
        hashed = list(pool.map(lambda piece: _piece_digest(folder / piece[0], piece[1]), pieces))
    out = {name: hashlib.blake2b(digest_size=20) for name in names}
    for (name, _), digest in zip(pieces, hashed):  # in file order
        out[name].update(digest)
    return {name: h.hexdigest() for name, h in out.items()}


def _piece_digest(path: Path, start: int) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        f.seek(start)
        left = _PIECE
        while left > 0:
            chunk = f.read(min(_READ, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.digest()


def _structural_damage(folder: Path) -> Optional[str]:
    for path in sorted(folder.rglob("*.safetensors")):
        name, size = path.relative_to(folder).as_posix(), path.stat().st_size
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if 8 + header_len > size:
                    return f"{name}: {size:,} bytes, shorter than its header (truncated)"
                header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError, IndexError) as e:
            return f"{name}: unreadable header ({type(e).__name__})"
        if size != 8 + header_len + end:
            return f"{name}: {size:,} bytes, its header says {8 + header_len + end:,} ({'truncated' if size < 8 + header_len + end else 'grown'})"
    for path in sorted(folder.rglob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return f"{path.relative_to(folder).as_posix()}: not valid JSON ({type(e).__name__})"
    return None
