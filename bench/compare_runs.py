"""bench/compare_runs.py A B: the same-outputs gate. Exit 0 when two output folders of bench/same_outputs.sh hold
the same files with the same contents; exit 1, listing every difference, otherwise.

Every file is compared, at any depth: rc.txt, the consoles (*.out, *.err), report.html, the cache, checkpoints,
weights. JSON, JSON lines and YAML are compared value by value (a changed, added or removed key is a difference,
at any depth); every other file byte for byte, after the normalisations below. A file on one side only is a
difference. The only exemptions, each for a value that changes between two runs of the same code:

- EXEMPT_KEYS: JSON/YAML keys holding wall-clock time or when something happened;
- EXEMPT_FILES: the reference cache's memo of file hashes, keyed by each file's modification time;
- VOLATILE: in text files, progress-bar redraws (how often a bar redraws depends on timing), durations
  ("12.3s", "4.5 it/s") and timestamps ("2026-12-05 21:14:07", 20261205-211407);
- a .safetensors file is its header's values and its data bytes (the writer orders the metadata keys at
  random, so the bytes of two identical files differ);
- the folder's own absolute path, replaced by <OUT> (same_outputs.sh runs every commit in the same folder, so
  fingerprints that hash a path agree; the replacement covers a copy moved elsewhere).

  python bench/compare_runs.py /tmp/before /tmp/after     # exit status 0: the gate passed
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from pathlib import Path

import yaml

EXEMPT_KEYS = frozenset(
    {
        "wall_seconds",
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "seconds",
        "elapsed",
        "created",
        "started",
        "saved_at",
        "time",
        "timestamp",
        "build_seconds",
        "tokens_per_second",
        "mfu",
        "mfu_peak",
        "mfu_peak_source",
    }
)  # the clock and the machine (training/throughput.py)
EXEMPT_FILES = frozenset({"file_hashes.json"})
VOLATILE = [
    (
        re.compile(r"<!--clock-->.*?<!--/clock-->", re.DOTALL),
        "<CLOCK>",
    ),  # report.html's tokens/s and MFU (report/page.py)
    (re.compile(r"(Trained with dpokit \S+ on )\d{4}-\d{2}-\d{2}"), r"\1<DATE>"),  # the model card's date
    (re.compile(r"^[^\n]*\d+/\d+ \[[\d:]+<[^\n]*$", re.MULTILINE), "<PROGRESS>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}([.,]\d+)?"), "<TIME>"),  # logging writes ",351"
    (re.compile(r"\b\d{8}-\d{6}\b"), "<TIME>"),
    (re.compile(r"\b\d+(\.\d+)?\s?(s|ms|it/s|s/it|min)\b"), "<DURATION>"),
]
STRUCTURED = (".json", ".jsonl", ".yaml", ".yml")


def normalised(text: str) -> str:
    """`text` with its VOLATILE parts replaced by tokens."""
    for pattern, token in VOLATILE:
        text = pattern.sub(token, text)
    return re.sub(r"(<PROGRESS>\n)+", "<PROGRESS>\n", text)  # a bar is one line however often it redrew


def normalised_text(path: Path, root: Path) -> str:
    return normalised(path.read_text(errors="replace").replace(str(root), "<OUT>"))


def load(path: Path, root: Path):
    text = path.read_text(errors="replace").replace(str(root), "<OUT>")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        return json.loads(text)
    return yaml.safe_load(text)


def walk(a, b, where: str, out: list[str]) -> None:
    """Every difference between two parsed values, as 'where: what' lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key in EXEMPT_KEYS:
                continue
            if key not in a:
                out.append(f"{where}{key}: only in B")
            elif key not in b:
                out.append(f"{where}{key}: only in A")
            else:
                walk(a[key], b[key], f"{where}{key}.", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where.rstrip('.')}: {len(a)} items -> {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{where}[{i}].", out)
    elif a != b and not (isinstance(a, str) and isinstance(b, str) and normalised(a) == normalised(b)):
        out.append(f"{where.rstrip('.')}: {str(a)[:60]!r} -> {str(b)[:60]!r}")


def _safetensors(path: Path) -> dict:
    """A safetensors file as {header: parsed JSON, data: the tensor bytes' digest}."""
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return {"header": json.loads(raw[8 : 8 + size]), "data": hashlib.sha256(raw[8 + size :]).hexdigest()}


def compare(a_root: Path, b_root: Path) -> list[str]:
    """Every difference between two output folders; empty when they are the same."""
    files_a = {p.relative_to(a_root) for p in a_root.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b_root) for p in b_root.rglob("*") if p.is_file()}
    found = [f"{rel}: only in A" for rel in sorted(files_a - files_b)]
    found += [f"{rel}: only in B" for rel in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        pa, pb = a_root / rel, b_root / rel
        if rel.name in EXEMPT_FILES:
            continue
        if rel.suffix == ".safetensors" and pa.read_bytes() != pb.read_bytes():
            try:
                out = []
                walk(*(_safetensors(p) for p in (pa, pb)), "", out)
                found += [f"{rel}: {line}" for line in out]
            except (ValueError, struct.error):  # not a readable safetensors file: its bytes differ, that is all
                found.append(f"{rel}: contents differ")
            continue
        if rel.suffix in STRUCTURED:
            try:
                out: list[str] = []
                walk(load(pa, a_root), load(pb, b_root), "", out)
                found += [f"{rel}: {line}" for line in out]
                continue
            except (ValueError, yaml.YAMLError):
                pass  # not parseable: compared as text below
        if pa.read_bytes() == pb.read_bytes():
            continue
        try:
            same = normalised_text(pa, a_root) == normalised_text(pb, b_root)
        except UnicodeDecodeError:
            same = False
        if not same:
            found.append(f"{rel}: contents differ")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    a_root, b_root = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    for root in (a_root, b_root):
        if not root.is_dir():
            print(f"compare_runs: {root} is not a folder", file=sys.stderr)
            return 2
    found = compare(a_root, b_root)
    for line in found:
        print(f"DIFFERS {line}")
    n = sum(1 for p in a_root.rglob("*") if p.is_file())
    print(f"compare_runs: {len(found)} difference(s) over {n} files" + ("" if found else ": the same outputs"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
