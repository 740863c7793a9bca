"""Layout detection and conversion: the exact prompt/chosen/rejected each layout yields, and honest skip counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.data.layouts import RowSkip, detect_layout, load_preferences, to_example
from dpokit.data.records import DataError
from tiny_assets import assistant, user

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def convert(row: dict, columns: dict | None = None):
    layout = detect_layout(row)
    example = to_example(row, layout, columns, "t.jsonl:1")
    return layout, example.prompt, example.chosen, example.rejected


# --- detection and conversion per layout ----------------------------------------------------


def test_prompt_chosen_rejected_text():
    assert convert({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}) == (
        "prompt_chosen_rejected",
        "Q: 2+2?",
        " 4",
        " 5",
    )


def test_prompt_chosen_rejected_conversational():
    row = {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}
    assert convert(row) == ("prompt_chosen_rejected", [user("Hi")], [assistant("Hello!")], [assistant("Go away.")])


def test_hh_rlhf_multi_turn_prompt_ends_after_the_last_assistant_tag():
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Can you help me bake bread?\n\nAssistant:"
    row = {"chosen": history + " Sure, start with flour.", "rejected": history + " Sure, but why?"}
    layout, prompt, chosen, rejected = convert(row)
    assert layout == "implicit_prompt"
    assert prompt == history
    assert (chosen, rejected) == (" Sure, start with flour.", " Sure, but why?")


def test_implicit_text_without_assistant_tag_cuts_at_the_common_prefix():
    assert convert({"chosen": "The sky is blue.", "rejected": "The sky is green."})[1:] == (
        "The sky is ",
        "blue.",
        "green.",
    )


def test_implicit_conversational_prompt_is_the_shared_message_prefix():
    shared = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Name a color.")]
    row = {"chosen": shared + [assistant("Blue.")], "rejected": shared + [assistant("I like turtles.")]}
    assert convert(row) == ("implicit_prompt", shared, [assistant("Blue.")], [assistant("I like turtles.")])


def test_text_prompt_column_with_full_conversations_uses_the_shared_messages():
    row = {"prompt": "Hi", "chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("No.")]}
    assert convert(row) == ("implicit_prompt", [user("Hi")], [assistant("Hello!")], [assistant("No.")])


def test_sharegpt_roles_are_mapped():
    row = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Joke?"},
        ],
        "chosen": {"from": "gpt", "value": "Knock knock."},
        "rejected": {"from": "gpt", "value": "No."},
    }
    layout, prompt, chosen, rejected = convert(row)
    assert layout == "sharegpt"
    assert prompt == [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello"), user("Joke?")]
    assert (chosen, rejected) == ([assistant("Knock knock.")], [assistant("No.")])


def test_openai_preference_layout():
    row = {
        "input": {"messages": [{"role": "developer", "content": "Terse."}, user("2+2?")], "tools": []},
        "preferred_output": [assistant("4")],
        "non_preferred_output": [assistant("Five")],
    }
    assert convert(row) == (
        "openai",
        [{"role": "system", "content": "Terse."}, user("2+2?")],
        [assistant("4")],
        [assistant("Five")],
    )


def test_alpaca_joins_instruction_and_input_and_ignores_output():
    row = {
        "instruction": "Fix grammar.",
        "input": "He go.",
        "output": "He goes.",
        "chosen": "He goes.",
        "rejected": "He goes, dummy.",
    }
    assert convert(row) == (
        "alpaca",
        [user("Fix grammar.\n\nHe go.")],
        [assistant("He goes.")],
        [assistant("He goes, dummy.")],
    )
    assert convert({"instruction": "Say hi.", "input": "", "chosen": "Hi", "rejected": "No"})[1] == [user("Say hi.")]


def test_stack_exchange_pairs_are_text():
    row = {"question": "How to sort?", "response_j": "Use sorted().", "response_k": "Don't."}
    assert convert(row) == ("stack_exchange", "How to sort?", "Use sorted().", "Don't.")


def test_unknown_layout_is_none():
    assert detect_layout({"text": "hello", "label": True}) is None


def test_column_mapping_overrides_detection():
    row = {"question": "2+2?", "good": "4", "bad": "5", "response_j": "ignored"}
    example = to_example(row, "stack_exchange", {"prompt": "question", "chosen": "good", "rejected": "bad"}, "x:1")
    assert (example.prompt, example.chosen, example.rejected, example.source) == ("2+2?", "4", "5", "x:1")


@pytest.mark.parametrize(
    "row, reason, field",
    [
        ({"prompt": "p", "chosen": "c"}, "rejected is missing", "rejected"),
        ({"prompt": "p", "chosen": " \n", "rejected": "r"}, "chosen is empty or whitespace-only", "chosen"),
        (
            {"prompt": [user("p")], "chosen": [{"role": "assistant"}], "rejected": [assistant("r")]},
            "chosen has a message without text content",
            "chosen",
        ),
        (
            {"prompt": [{"content": "p"}], "chosen": [assistant("c")], "rejected": [assistant("r")]},
            "prompt has a message without a role",
            "prompt",
        ),
        (
            {"prompt": [], "chosen": [assistant("c")], "rejected": [assistant("r")]},
            "prompt is an empty conversation",
            "prompt",
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": [assistant("r")]},
            "prompt, chosen and rejected mix text and message lists",
            "rejected",
        ),
        (
            {"chosen": [user("a"), assistant("c")], "rejected": [user("b"), assistant("r")]},
            "chosen and rejected share no prompt messages",
            "prompt",
        ),
        (
            {"chosen": [user("a"), assistant("c")], "rejected": [user("a"), user("again"), assistant("r")]},
            "rejected does not start with an assistant message",
            "rejected",
        ),
        (
            {"chosen": "same", "rejected": "same"},
            "chosen has nothing left after the prompt shared with the other response",
            "chosen",
        ),
        (
            {
                "conversations": [{"from": "observation", "value": "x"}],
                "chosen": {"from": "gpt", "value": "c"},
                "rejected": {"from": "gpt", "value": "r"},
            },
            "conversations has a message with unsupported role 'observation'",
            "conversations",
        ),
    ],
)
def test_row_problems_raise_row_skip_with_reason_and_field(row, reason, field):
    with pytest.raises(RowSkip) as caught:
        to_example(row, detect_layout(row), None, "t.jsonl:1")
    assert (caught.value.reason, caught.value.field) == (reason, field)


# --- load_preferences -----------------------------------------------------------------------


def test_skips_are_counted_with_reason_and_row(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": "b"},
            {"prompt": "a", "chosen": "", "rejected": "c"},
            {"prompt": "a", "chosen": "b", "rejected": "  \t"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
        ],
    )
    examples, report = load_preferences(path)
    assert [example.source for example in examples] == [f"{path}:1", f"{path}:5"]
    assert (report.rows_read, report.rows_used, report.rows_skipped) == (5, 2, 3)
    assert report.layouts == {"prompt_chosen_rejected": 1, "implicit_prompt": 1}
    assert report.examples == {
        "rejected is missing": [f"{path}:2 (rejected)"],
        "chosen is empty or whitespace-only": [f"{path}:3 (chosen)"],
        "rejected is empty or whitespace-only": [f"{path}:4 (rejected)"],
    }


def test_column_mapping_in_load_preferences(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"q": "2+2?", "good": "4", "bad": "5"}, {"q": "x", "good": "y"}])
    examples, report = load_preferences(path, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [("2+2?", "4", "5")]
    assert report.layouts == {"prompt_chosen_rejected": 1}
    assert report.examples == {"column 'bad' (mapped to rejected) is missing": [f"{path}:2 (bad)"]}


def test_explicit_layout_skips_detection(tmp_path):
    row = {"prompt": "ignored", "chosen": "The sky is blue", "rejected": "The sky is red"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [row])
    examples, report = load_preferences(path, layout="implicit_prompt")
    assert (examples[0].prompt, examples[0].chosen) == ("The sky is ", "blue")
    assert report.layouts == {"implicit_prompt": 1}


def test_strict_mode_raises_on_the_first_bad_row_naming_file_row_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": " "}],
    )
    with pytest.raises(DataError) as caught:
        load_preferences(path, strict=True)
    assert str(caught.value) == f"{path}, row 2, field 'rejected': rejected is empty or whitespace-only"
    assert (caught.value.row, caught.value.field) == (2, "rejected")


def test_every_row_bad_is_an_error_naming_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"messages": [user("hi")], "label": True}] * 3)
    with pytest.raises(DataError) as caught:
        load_preferences(path)
    message = str(caught.value)
    assert "all 3 rows were skipped" in message
    assert "unrecognised layout (columns: label, messages" in message
    assert "Columns found: label, messages" in message and "sharegpt" in message


@pytest.mark.parametrize(
    "options", [{"layout": "kto"}, {"columns": {"answer": "x"}}, {"columns": {"chosen": "x"}, "layout": "alpaca"}]
)
def test_invalid_options_are_data_errors(tmp_path, options):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError):
        load_preferences(path, **options)


# --- real samples in shared/data ------------------------------------------------------------


def shared_sample(relative: str) -> str:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA}")
    return str(SHARED_DATA / relative)


def test_real_sharegpt_pairwise_sample():
    examples, report = load_preferences(shared_sample("sharegpt_pairwise_dpo/dpo_en_demo.json"))
    assert (report.rows_read, report.rows_used, report.rows_skipped) == (300, 300, 0)
    assert report.layouts == {"sharegpt": 300}
    first = examples[0]
    assert first.prompt == [
        user(
            "Hi! I'd like to create a new language game simulating the first person "
            "perspective of a character named Angela."
        )
    ]
    assert first.chosen[0]["content"].startswith("That sounds like a fun and engaging idea!")
    assert first.rejected[0]["content"].startswith("Hello! I'd be happy to help you")
    assert all(example.prompt[-1]["role"] == "user" for example in examples)
    assert any(example.prompt[0]["role"] == "system" for example in examples)


def test_real_instruction_input_chosen_rejected_sample():
    examples, report = load_preferences(
        shared_sample("instruction_input_chosen_rejected/instruction-data-with-preference.json")
    )
    assert (report.rows_read, report.rows_used, report.rows_skipped) == (1100, 1100, 0)
    assert report.layouts == {"alpaca": 1100}
    first = examples[0]
    assert first.prompt == [
        user("Evaluate the following phrase by transforming it into the spelling given.\n\nfreind --> friend")
    ]
    assert first.chosen == [
        assistant('The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".')
    ]
    assert "flat out wrong" in first.rejected[0]["content"]
    assert examples[2].prompt == [user("Convert 45 kilometers to meters.")]  # empty input: no blank lines added


def test_real_stack_exchange_paired_sample():
    examples, report = load_preferences(shared_sample("stack_exchange_paired/stack_exchange_paired_tiny.json"))
    assert (report.rows_read, report.rows_used, report.rows_skipped) == (25, 25, 0)
    assert report.layouts == {"stack_exchange": 25}
    first = examples[0]
    assert first.prompt.startswith("I'm writing a code using Java Swing to press the right button")
    assert first.chosen.startswith("The code you are showing does exactly one thing")
    assert first.rejected.startswith("When you do this:")
    assert not first.conversational
