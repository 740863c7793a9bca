"""bench/refresh_docs.py: its markers, rewriting and --check comparison on a page of our own, and every marked
block of docs/ naming the commands that produced it. Nothing here runs the demo."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # bench/ holds scripts, not a package; refresh_docs imports doc_blocks

import doc_blocks  # noqa: E402
import refresh_docs  # noqa: E402

PAGE = """# A page

Prose with 12 numbers that no marker owns, and a marker quoted in prose: `<!-- refresh_docs:NAME begin -->`.

<!-- refresh_docs:first begin -->
Measured by `python bench/refresh_docs.py --only first` on 2026-12-01; wall time 40 s:

| metric | value |
|---|---|
| delta | 0.202 |
<!-- refresh_docs:first end -->

Between the blocks.
<!-- refresh_docs:second begin -->
old second
<!-- refresh_docs:second end -->
The end.
"""


def test_blocks_are_found_by_name_with_the_text_between_their_markers():
    blocks = refresh_docs.find_blocks(PAGE)
    assert list(blocks) == ["first", "second"]
    assert blocks["second"].body == "old second\n"
    assert blocks["first"].body.startswith("Measured by `python bench/refresh_docs.py --only first`")
    assert blocks["first"].body.endswith("| delta | 0.202 |\n")


def test_rewriting_one_block_leaves_the_markers_and_everything_else_alone(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    new = refresh_docs.replace_block(page.read_text(), "second", "new second\nline two")
    assert new == PAGE.replace("old second\n", "new second\nline two\n")
    again = refresh_docs.replace_block(new, "first", "Measured by x on 2026-12-05\n\n| delta | 0.325 |\n")
    assert refresh_docs.find_blocks(again)["first"].body == "Measured by x on 2026-12-05\n\n| delta | 0.325 |\n"
    assert refresh_docs.find_blocks(again)["second"].body == "new second\nline two\n"
    assert again.startswith("# A page\n\nProse with 12 numbers") and again.endswith("The end.\n")


A_BEGIN, A_END = "<!-- refresh_docs:a begin -->\n", "<!-- refresh_docs:a end -->\n"
B_BEGIN = "<!-- refresh_docs:b begin -->\n"


@pytest.mark.parametrize(
    "broken,message",
    [
        (A_BEGIN + "x\n", "refresh_docs:a has no end marker"),
        ("x\n" + A_END, "line 2: refresh_docs:a ends without its begin"),
        (A_BEGIN + B_BEGIN, "line 2: refresh_docs:b begins inside refresh_docs:a"),
        (A_BEGIN + A_END + A_BEGIN + A_END, "line 3: refresh_docs:a is marked twice"),
    ],
)
def test_markers_that_do_not_pair_up_are_an_error_naming_the_line(broken, message):
    with pytest.raises(refresh_docs.MarkerError, match=re.escape(message)):
        refresh_docs.find_blocks(broken)
    with pytest.raises(refresh_docs.MarkerError, match="no refresh_docs:missing block"):
        refresh_docs.replace_block(PAGE, "missing", "x")


def test_check_compares_the_numbers_below_the_provenance_line_within_the_tolerance():
    old = "Measured on 2026-12-01, wall time 40 s:\n| a | 44.3% | 0.202 | 256 |\n"
    # The date and wall time on the provenance line may change; numbers inside the tolerance may too.
    assert (
        refresh_docs.moved_numbers(
            old, "Measured on 2026-12-05, wall time 95 s:\n| a | 45.9% | 0.210 | 256 |\n", rel_tol=0.05, abs_tol=0.02
        )
        == []
    )
    # The case: 0.202 on the page, 0.325 measured.
    moved = refresh_docs.moved_numbers(old, "Measured:\n| a | 44.3% | 0.325 | 256 |\n", rel_tol=0.05, abs_tol=0.02)
    assert moved == ["number 2: 0.202 -> 0.325 (tolerance 0.02)"]
    assert refresh_docs.moved_numbers(old, "Measured:\n| a | 44.3% | 0.202 |\n", 0.05, 0.02) == [
        "3 numbers on the page, 2 measured now: the block's shape changed"
    ]


def test_numbers_are_read_as_written():
    assert refresh_docs.numbers("44.3% and -0.043, 1,234 tokens, lr 5e-4, k3 and step-1 (r - 1)") == [
        44.3,
        -0.043,
        1234.0,
        5e-4,
        1.0,
    ]


def test_every_marked_block_in_the_docs_names_its_commands_and_a_known_block():
    pages = refresh_docs.marked_pages()
    found = {name: page for page, blocks in pages.items() for name in blocks}
    assert set(found) == set(doc_blocks.BLOCKS), "a block in docs/ without a recipe, or a recipe without its block"
    for name, page in found.items():
        spec = doc_blocks.BLOCKS[name]
        assert page == ROOT / "docs" / spec.page, (name, page)
        body = pages[page][name].body
        first = refresh_docs.provenance_and_rest(body)[0]
        assert f"`python bench/refresh_docs.py --only {name}`" in first, (name, first)
        fence = re.search(r"```bash\n(.*?)```", body, flags=re.S)
        assert fence, f"{name}: no ```bash block of commands"
        assert fence.group(1).splitlines() == doc_blocks.commands(spec.runs, reuse_cache=False), name
        assert any(line.startswith(("dpokit ", "python ")) for line in fence.group(1).splitlines()), name


def test_every_run_names_a_command_that_writes_under_the_refresh_folder():
    for name, run in doc_blocks.RUNS.items():
        script = run.script(reuse_cache=False)
        assert script[0].startswith(f"export DPOKIT_CACHE={doc_blocks.WORK}/"), name  # a fresh install's cache
        assert all(doc_blocks.WORK in line for line in script), name
        assert set(run.needs) <= set(doc_blocks.RUNS), name
