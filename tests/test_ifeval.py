"""IFEval-style checkers: each instruction id with a hand-worked passing and failing response, and the four accuracies."""

from __future__ import annotations

import json

import pytest

from dpokit.online.suites import ifeval_data
from dpokit.online.suites.ifeval import DEFAULT_PROMPTS, IFEvalDataError, load_ifeval, loose_variants, score_ifeval
from dpokit.online.suites.ifeval_checks import CHECKERS

# (instruction id, kwargs, a response that follows it, one that does not) -- counts worked out by hand in the comments.
CASES = [
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than"},
        "one two three four",
        "one two three four five",
    ),  # 4 < 5; 5 is not < 5
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "at least"},
        "it's fine",
        "fine",
    ),  # it, s, fine = 3
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at least"},
        "It rains. Is it cold?!",
        "It rains and it is 3.5 degrees.",
    ),  # 2 sentences; the decimal point does not end one
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First part.\n***\nSecond part.",
        "First.\n***\n\n***\nThird.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        'We began.\n\n"Then, we ate.',
        "We began.\n\nAfter that then.",
    ),
    ("keywords:existence", {"keywords": ["river", "Light"]}, "The light on the River.", "The lights on the river."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "Two cats and a concatenation.", "A Cat sat."),
    (
        "keywords:frequency",
        {"keyword": "tea", "frequency": 2, "relation": "at least"},
        "Tea, then more tea.",
        "Tea and teapots.",
    ),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "less than"}, "Tea and teapots.", "tea tea"),
    (
        "keywords:letter_frequency",
        {"letter": "a", "let_frequency": 3, "let_relation": "at least"},
        "A banana",
        "Apple pie",
    ),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, one."),
    ("change_case:english_lowercase", {}, "all small, 42 too.", "all small but One."),
    ("change_case:english_capital", {}, "ALL CAPS, 42!", "ALL CAPS bUT ONE"),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "Go NOW, AI2 is here.",
        "Go NOW, a1 and 42 are here.",
    ),  # NOW, AI2 = 2 | NOW = 1 (42 has no letter)
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', 'Here it is: {"a": 1}'),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "* one\n- two\n**bold** line",
        "* one\n* two\n* three",
    ),
    ("detectable_format:title", {}, "<<Poem of joy>>\nText.", "<< >> and <no title>"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nIntro.\nSECTION 2\nBody.",
        "SECTION 1\nAll in one section.",
    ),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* and ** **"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "My answer is perhaps."),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. any other questions?  ",
        "Any other questions? Bye.",
    ),
    ("startend:quotation", {}, '  "All quoted."\n', '"Half quoted.'),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np.s. see you", "Hi. P.S."),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Send [name] to [address].",
        "Send [name] to [].",
    ),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ("combination:two_responses", {}, "Yes.\n******\nNo.", "Same.\n******\nSame."),
]


@pytest.mark.parametrize("instruction, kwargs, good, bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_checker_passes_and_fails(instruction, kwargs, good, bad):
    check = CHECKERS[instruction]
    assert check(good, **kwargs) is True
    assert check(bad, **kwargs) is False


def test_capital_word_frequency_counts_by_hand():
    check = CHECKERS["change_case:capital_word_frequency"]
    # capital words: NOW and AI2 (2); "42" has no letter, "Go" is not all capitals
    assert check("Go NOW, AI2 is 42.", capital_frequency=2, capital_relation="at least")
    assert not check("Go NOW, AI2 is 42.", capital_frequency=3, capital_relation="at least")
    assert not check("Go NOW, AI2 is 42.", capital_frequency=2, capital_relation="less than")
    assert check("Go Now.", capital_frequency=1, capital_relation="less than")


def test_every_id_has_a_case_and_there_are_at_least_15_kinds():
    assert {c[0] for c in CASES} == set(CHECKERS) and len(CHECKERS) >= 15


def test_a_bad_relation_is_an_error():
    with pytest.raises(ValueError, match="relation"):
        CHECKERS["length_constraints:number_words"]("a b", num_words=2, relation="more than")


def test_loose_variants_are_the_papers_eight():
    variants = loose_variants("Sure:\n*yes*\nBye")
    assert variants == [
        "Sure:\n*yes*\nBye",
        "*yes*\nBye",
        "Sure:\n*yes*",
        "*yes*",
        "Sure:\nyes\nBye",
        "yes\nBye",
        "Sure:\nyes",
        "yes",
    ]


def test_prompt_and_instruction_level_strict_and_loose():
    rows = [
        {
            "key": 1,
            "prompt": "p",
            "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
            "kwargs": [{}, {}],
        },
        {"key": 2, "prompt": "q", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
    ]
    # row 1: no comma (yes), quoted only once the "Sure" line is removed -> strict 1/2, loose 2/2
    # row 2: an upper-case first line: strict fails, loose (first line removed) passes
    responses = ['Sure here it is\n"quoted"', "Hello\nall lowercase"]
    out = score_ifeval(rows, responses)
    assert out["inst_level_strict_acc"] == pytest.approx(1 / 3)
    assert out["prompt_level_strict_acc"] == 0.0
    assert out["inst_level_loose_acc"] == 1.0 and out["prompt_level_loose_acc"] == 1.0
    assert out["per_prompt"][0]["strict"] == [True, False] and out["per_prompt"][0]["loose"] == [True, True]
    assert out["prompt_level_loose_acc_sem"] == 0.0 and out["num_instructions"] == 3


def test_an_empty_response_follows_nothing():
    rows = [{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}]
    assert score_ifeval(rows, [""])["inst_level_loose_acc"] == 0.0


def test_bad_rows_name_file_row_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    good = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": None}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "instruction_id_list": ["language:klingon"]}) + "\n")
    with pytest.raises(
        IFEvalDataError, match=r"p.jsonl, row 2: field 'instruction_id_list'\[0\]: unknown instruction id"
    ):
        load_ifeval(path)
    path.write_text(
        json.dumps({**good, "instruction_id_list": ["keywords:existence"], "kwargs": [{"words": ["a"]}]}) + "\n"
    )
    with pytest.raises(IFEvalDataError, match=r"row 1: field 'kwargs'\[0\] does not fit keywords:existence"):
        load_ifeval(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_ifeval(path)[0]["kwargs"] == [{}]  # the paper's None arguments are dropped


def test_the_shipped_prompt_set_is_the_generated_one_and_loads():
    assert DEFAULT_PROMPTS.read_text(encoding="utf-8") == ifeval_data.to_jsonl(ifeval_data.build_prompts())
    rows = load_ifeval()
    assert len(rows) == 48 and {i for r in rows for i in r["instruction_id_list"]} == set(CHECKERS)
