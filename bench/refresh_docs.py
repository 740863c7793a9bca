"""Rerun the cheap measured commands behind numbers in docs/ and rewrite those numbers between markers.

    python bench/refresh_docs.py                  # rerun every block, rewrite the pages, print each diff
    python bench/refresh_docs.py --only demo      # one block (and the runs it reads); repeatable
    python bench/refresh_docs.py --check          # rerun, write nothing; exit 1 if a number moved past the tolerance
    python bench/refresh_docs.py --list           # the blocks, their pages and commands, without running anything

A measured block of a page sits between two markers and is written only by this script:

    <!-- refresh_docs:NAME begin -->
    Measured by `python bench/refresh_docs.py --only NAME`, DATE, MACHINE, wall times:   <- the provenance line
    ```bash
    the commands that produced the numbers, exactly as run (from the repository root)
    ```
    the numbers (a table, a console excerpt)
    <!-- refresh_docs:NAME end -->

The blocks and how each is measured and rendered are in bench/doc_blocks.py. Everything runs
under runs/refresh_docs/ (git-ignored; emptied first), with an empty DPOKIT_CACHE unless
--reuse-cache, so the demo's SFT model is built as on a fresh install: numbers measured on a
stale cache were how docs/evaluation.md came to quote an older SFT build.

--check compares the numbers of each block, below its provenance line (which holds the date and
the wall times), in order: a number has moved when it differs from the page's by more than the
block's tolerance, max(abs_tol, rel_tol x |old value|); a block whose count of numbers changed has
moved too. It prints the diff of every block that changed at all and exits 1 when one moved.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- refresh_docs:([\w-]+) (begin|end) -->[ \t]*$", re.M)  # a marker is a line of its own
NUMBER = re.compile(r"(?<![\w.-])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")


class MarkerError(ValueError):
    """A page's markers do not pair up: a begin without its end, an end first, a name used twice."""


@dataclass(frozen=True)
class Block:
    """One marked block of a page: its name and the text between its markers (without the marker lines)."""

    name: str
    body: str
    start: int  # offset of the first character after the begin marker's line
    end: int  # offset of the end marker


def find_blocks(text: str) -> dict[str, Block]:
    """Every marked block of a page, by name; MarkerError names the first marker that does not pair up."""
    blocks: dict[str, Block] = {}
    open_name, open_at = None, 0
    for match in MARKER.finditer(text):
        name, kind = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        if kind == "begin":
            if open_name is not None:
                raise MarkerError(f"line {line}: refresh_docs:{name} begins inside refresh_docs:{open_name}")
            if name in blocks:
                raise MarkerError(f"line {line}: refresh_docs:{name} is marked twice on the page")
            open_name = name
            newline = text.find("\n", match.end())
            open_at = len(text) if newline < 0 else newline + 1
        else:
            if open_name != name:
                raise MarkerError(f"line {line}: refresh_docs:{name} ends without its begin")
            blocks[name] = Block(name, text[open_at : match.start()], open_at, match.start())
            open_name = None
    if open_name is not None:
        raise MarkerError(f"refresh_docs:{open_name} has no end marker")
    return blocks


def replace_block(text: str, name: str, body: str) -> str:
    """The page with block `name`'s text replaced by `body` (a trailing newline is added); the markers stay."""
    block = find_blocks(text).get(name)
    if block is None:
        raise MarkerError(f"no refresh_docs:{name} block on the page")
    return text[: block.start] + body.rstrip("\n") + "\n" + text[block.end :]


def provenance_and_rest(body: str) -> tuple[str, str]:
    """(first non-empty line, the rest): the line that names the command, date and wall times, and the measured text."""
    lines = body.strip("\n").split("\n")
    return lines[0], "\n".join(lines[1:])


def numbers(text: str) -> list[float]:
    """Every number of the text, in order: 1,234 is one number, 44.3% is 44.3; digits in a word (k3, step-1) are not."""
    return [float(m.group(0).replace(",", "")) for m in NUMBER.finditer(text)]


def moved_numbers(old_body: str, new_body: str, rel_tol: float, abs_tol: float) -> list[str]:
    """How the block's measured numbers moved past the tolerance (empty if none did); the provenance line is skipped."""
    old, new = numbers(provenance_and_rest(old_body)[1]), numbers(provenance_and_rest(new_body)[1])
    if len(old) != len(new):
        return [f"{len(old)} numbers on the page, {len(new)} measured now: the block's shape changed"]
    return [
        f"number {i + 1}: {a:g} -> {b:g} (tolerance {max(abs_tol, rel_tol * abs(a)):g})"
        for i, (a, b) in enumerate(zip(old, new))
        if abs(b - a) > max(abs_tol, rel_tol * abs(a))
    ]


def diff(page: str, name: str, old_body: str, new_body: str) -> str:
    old_lines = (old_body.strip("\n") + "\n").splitlines(True)
    new_lines = (new_body.strip("\n") + "\n").splitlines(True)
    return "".join(
        difflib.unified_diff(old_lines, new_lines, f"{page} [{name}] on the page", f"{page} [{name}] measured now")
    )


def marked_pages(docs: Path = ROOT / "docs") -> dict[Path, dict[str, Block]]:
    """Every page of docs/ (and README.md) that holds a marked block, with its blocks."""
    pages = [ROOT / "README.md", *sorted(docs.glob("*.md"))]
    found = {}
    for page in pages:
        if page.exists():
            blocks = find_blocks(page.read_text(encoding="utf-8"))
            if blocks:
                found[page] = blocks
    return found


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import doc_blocks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(doc_blocks.BLOCKS), help="refresh this block only")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a number moved too far")
    parser.add_argument("--list", action="store_true", help="list the blocks and their commands; run nothing")
    parser.add_argument("--reuse-cache", action="store_true", help="use $DPOKIT_CACHE as is (default: an empty one)")
    args = parser.parse_args(argv)
    names = args.only or sorted(doc_blocks.BLOCKS)
    if args.list:
        for name in names:
            spec = doc_blocks.BLOCKS[name]
            print(f"{name}: docs/{spec.page} (tolerance rel {spec.rel_tol:g}, abs {spec.abs_tol:g})")
            print("    " + "\n    ".join(doc_blocks.commands(spec.runs, args.reuse_cache)))
        return 0
    runner = doc_blocks.Runner(ROOT, reuse_cache=args.reuse_cache)
    moved = False
    for name in names:
        spec = doc_blocks.BLOCKS[name]
        page = ROOT / "docs" / spec.page
        text = page.read_text(encoding="utf-8")
        old = find_blocks(text).get(name)
        if old is None:
            raise SystemExit(f"docs/{spec.page} has no refresh_docs:{name} block; add its two markers first")
        new_body = spec.render(runner)
        changes = moved_numbers(old.body, new_body, spec.rel_tol, spec.abs_tol)
        moved = moved or bool(changes)
        if old.body.strip("\n") != new_body.strip("\n"):
            print(diff(f"docs/{spec.page}", name, old.body, new_body))
        verdict = "; ".join(changes) if changes else "numbers within tolerance"
        print(f"[refresh_docs] {name} (docs/{spec.page}): {verdict}", flush=True)
        if not args.check:
            page.write_text(replace_block(page.read_text(encoding="utf-8"), name, new_body), encoding="utf-8")
    if args.check and moved:
        print(
            "[refresh_docs] numbers moved past their tolerance: run bench/refresh_docs.py (without --check) and "
            "commit the pages, after reading why they moved"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
