"""Every turn of a conversation: each judged assistant turn becomes a pair; exact prompts, counts, skips, a run."""

import json

from dpokit.config import load_config
from dpokit.data.layouts import detect_layout, load_preference_groups, load_preferences
from dpokit.data.packing import Layout, collate_packed
from dpokit.data.prepare import format_summary, prepare_data
from dpokit.data.token_health import paired_rows
from dpokit.data.tokenization import tokenize_pairs
from dpokit.data.unpaired import load_unpaired
from tiny_assets import assistant, tiny_model_dir, user, vocab_ids, word_tokenizer, write_jsonl

EOS = "<|im_end|>"


def judged(chosen, rejected) -> dict:
    return {"role": "assistant", "chosen": chosen, "rejected": rejected}


CONVERSATION = {
    "messages": [  # judged at turns 1 and 3; turn 2 is context
        user("hi"),
        judged("hello", "no"),
        user("how are you"),
        assistant("i am fine"),
        user("tell me story"),
        judged("once upon time", "no"),
    ]
}
ONE_TURN = {"messages": [user("what colour sky"), judged("blue", "green")]}
PLAIN = {"prompt": "the film was", "chosen": " good", "rejected": " bad"}


def turn(role: str, text: str) -> str:
    return f"<|im_start|> {role} {text} {EOS}"


def test_a_conversation_expands_to_one_pair_per_judged_turn_with_the_chosen_history(tmp_path):
    assert detect_layout(CONVERSATION) == "every_turn"
    path = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION, ONE_TURN, PLAIN])
    groups, report = load_preference_groups(str(path))
    assert [len(g) for g in groups] == [2, 1, 1]
    assert (report.rows_read, report.rows_used, report.conversations, report.turn_pairs) == (3, 3, 2, 3)
    assert report.layouts == {"every_turn": 2, "prompt_chosen_rejected": 1}
    first, second = groups[0]
    assert (first.turn, second.turn, first.source, second.source) == (1, 2, f"{path}:1", f"{path}:1")
    assert first.prompt == [user("hi")]
    assert second.prompt == [
        user("hi"),
        assistant("hello"),
        user("how are you"),
        assistant("i am fine"),
        user("tell me story"),
    ]
    assert (second.chosen, second.rejected) == ([assistant("once upon time")], [assistant("no")])

    pairs, _ = tokenize_pairs([first, second], word_tokenizer(), max_length=64, max_prompt_length=48)
    assert pairs[0].prompt_ids == vocab_ids(f"{turn('user', 'hi')} <|im_start|> assistant")
    assert pairs[0].chosen_ids == vocab_ids(f"hello {EOS}") and pairs[0].rejected_ids == vocab_ids(f"no {EOS}")
    history = " ".join(
        [
            turn("user", "hi"),
            turn("assistant", "hello"),
            turn("user", "how are you"),
            turn("assistant", "i am fine"),
            turn("user", "tell me story"),
        ]
    )
    assert pairs[1].prompt_ids == vocab_ids(f"{history} <|im_start|> assistant")
    assert pairs[1].chosen_ids == vocab_ids(f"once upon time {EOS}") and pairs[1].rejected_ids == vocab_ids(f"no {EOS}")
    # token health matches each pair to its own turn's text, though the pairs share their source row
    health = paired_rows([first, second], pairs)
    assert [row.prompt_text for row in health] == ["hi", "hi\nhello\nhow are you\ni am fine\ntell me story"]


def test_prefix_sharing_computes_each_expanded_prompt_once(tmp_path):
    examples, _ = load_preferences(str(write_jsonl(tmp_path / "d.jsonl", [CONVERSATION])))
    pairs, _ = tokenize_pairs(examples, word_tokenizer(), max_length=64, max_prompt_length=48)
    shared = collate_packed(pairs, 0, Layout(packing=True, prefix_sharing=True))
    plain = collate_packed(pairs, 0, Layout(packing=True, prefix_sharing=False))
    tokens = lambda batch: int((batch["segment_ids"] >= 0).sum())  # noqa: E731
    prompts = sum(len(p.prompt_ids) for p in pairs)
    assert tokens(plain) - tokens(shared) == prompts  # the prompt is no longer run twice per pair
    assert tokens(shared) == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def test_malformed_judged_turns_skip_the_whole_conversation_with_the_reason(tmp_path):
    rows = [
        CONVERSATION,
        {"messages": [user("hi"), {"role": "assistant", "chosen": "hello"}]},
        {"messages": [{"role": "user", "chosen": "hi", "rejected": "no"}]},
        {"messages": [user("hi"), {"role": "assistant", "content": "hello", "chosen": "hello", "rejected": "no"}]},
        {"messages": [judged("hello", "no")]},
        {"messages": [user("hi"), judged("  ", "no")]},
    ]
    _, report = load_preference_groups(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert (report.rows_used, report.rows_skipped, report.turn_pairs) == (1, 5, 2)
    reasons = " | ".join(report.skipped)
    for words in (
        "has chosen but no rejected",
        "its role is 'user'",
        "content as well as chosen/rejected",
        "no prompt before it",
        "chosen is empty",
    ):
        assert words in reasons, words


def test_the_data_summary_reports_the_expansion_and_kto_reads_every_turn_rows_as_pairs(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CONVERSATION, ONE_TURN, PLAIN])
    cfg = load_config(None, {"data.path": str(path), "data.max_length": 64})
    data = prepare_data(cfg, word_tokenizer())
    assert data.summary["train"]["every_turn"] == {"conversations": 2, "pairs": 3}
    assert data.summary["train"]["pairs"] == 4 and data.summary["train"]["rows_used"] == 3
    assert "every turn: 2 conversations -> 3 pairs" in format_summary(data.summary)
    groups, _ = load_unpaired(str(path))
    assert [len(g) for g in groups] == [4, 2, 2]  # a conversation's halves stay one group (one row)


def test_every_turn_rows_train(tmp_path):
    import dpokit

    rows = [CONVERSATION, ONE_TURN] * 4
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(write_jsonl(tmp_path / "d.jsonl", rows)), "max_length": 64},
        "train": {"batch_size": 4, "max_steps": 2, "logging_steps": 1, "progress_bar": False},
        "out_dir": str(tmp_path / "run"),
    }
    result = dpokit.train(cfg)
    summary = json.loads((result.run_dir / "data_summary.json").read_text())
    assert summary["train"]["every_turn"] == {"conversations": 8, "pairs": 12} and summary["train"]["pairs"] == 12


def test_kto_and_sft_count_the_expansion_and_keep_a_conversation_in_one_split(tmp_path):
    from dpokit.data.sft import prepare_sft
    from dpokit.data.unpaired import prepare_unpaired

    rows = [CONVERSATION, ONE_TURN, PLAIN] * 4
    cfg = load_config(
        None,
        {"data.path": str(write_jsonl(tmp_path / "d.jsonl", rows)), "data.max_length": 64, "data.eval_fraction": 0.25},
    )
    for prepare, per_pair in ((prepare_unpaired, 2), (prepare_sft, 1)):
        data = prepare(cfg, word_tokenizer())
        train, held = data.summary["train"], data.summary["eval"]
        assert train["rows_used"] + held["rows_used"] == 12 and held["rows_used"] >= 3  # rows, not pairs
        # a conversation's pairs (and KTO halves) never straddle the split
        assert not {e.source for e in data.train} & {e.source for e in data.eval}
        assert train["every_turn"]["conversations"] + held["every_turn"]["conversations"] == 8
        assert train["every_turn"]["pairs"] + held["every_turn"]["pairs"] == 12
        assert train["pairs"] + held["pairs"] == 16 * per_pair  # examples: both halves for KTO, the chosen side for SFT
