"""Exact token ids and label masks, checked against hand lookups in a word-level vocabulary."""

import torch

from dpokit.data.collate import collate_pairs
from dpokit.data.records import PreferenceExample, SkipReport
from dpokit.data.tokenization import tokenize_pairs
from dpokit.logprobs import IGNORE_INDEX
from tiny_assets import vocab_ids, word_tokenizer

EOS = "<|im_end|>"


def _one(example, max_length=64, max_prompt_length=32):
    report = SkipReport(rows_read=1, rows_used=1)
    pairs, stats = tokenize_pairs([example], word_tokenizer(), max_length, max_prompt_length, report)
    return pairs, stats, report


def test_text_pair_is_prompt_then_completion_then_eos():
    pairs, _, _ = _one(PreferenceExample("the film was", " good", " bad acting"))
    (pair,) = pairs
    assert pair.prompt_ids == vocab_ids("the film was")
    assert pair.chosen_ids == vocab_ids(f"good {EOS}")
    assert pair.rejected_ids == vocab_ids(f"bad acting {EOS}")


def test_eos_is_not_doubled_when_text_already_ends_with_it():
    pairs, _, _ = _one(PreferenceExample("the film was", f" good{EOS}", " bad"))
    assert pairs[0].chosen_ids == vocab_ids(f"good {EOS}")


def test_conversational_pair_goes_through_the_chat_template():
    prompt = [{"role": "system", "content": "hi"}, {"role": "user", "content": "what colour sky"}]
    chosen = [{"role": "assistant", "content": "blue"}]
    rejected = [{"role": "assistant", "content": "green maybe"}]
    pairs, _, _ = _one(PreferenceExample(prompt, chosen, rejected))
    (pair,) = pairs
    assert pair.prompt_ids == vocab_ids(
        f"<|im_start|> system hi {EOS} <|im_start|> user what colour sky {EOS} <|im_start|> assistant"
    )
    # the completion is the assistant turn exactly, ending with the end-of-turn token (= EOS)
    assert pair.chosen_ids == vocab_ids(f"blue {EOS}")
    assert pair.rejected_ids == vocab_ids(f"green maybe {EOS}")


def test_prompt_truncated_from_the_left_completion_from_the_right():
    example = PreferenceExample("tell me a story once upon a time", " yes it is very good", " no")
    pairs, stats, _ = _one(example, max_length=7, max_prompt_length=4)
    (pair,) = pairs
    assert pair.prompt_ids == vocab_ids("once upon a time")  # the latest tokens survive
    assert pair.chosen_ids == vocab_ids("yes it is")  # cut to fit 7 - 4 = 3 tokens; EOS lost
    assert pair.rejected_ids == vocab_ids(f"no {EOS}")  # fits, keeps EOS
    assert (stats.prompts_truncated, stats.chosen_truncated, stats.rejected_truncated) == (1, 1, 0)


def test_pair_with_empty_completion_is_dropped_and_counted():
    # a prompt that fills max_length leaves no room for any completion token
    example = PreferenceExample("the film was", " good", " bad", source="data.jsonl:3")
    pairs, _, report = _one(example, max_length=3, max_prompt_length=3)
    assert pairs == []
    assert report.rows_used == 0
    assert report.rows_skipped == 1
    (reason,) = report.skipped
    assert "empty" in reason
    assert "data.jsonl:3" in report.examples[reason][0]


def test_collate_orders_chosen_then_rejected_and_masks_prompt_and_padding():
    pairs, _, _ = _one(PreferenceExample("the film", " good", " bad acting"))
    pairs2, _, _ = _one(PreferenceExample("it was", " fine", " awful"))
    pad = word_tokenizer().pad_token_id
    batch = collate_pairs(pairs + pairs2, pad)
    assert batch["input_ids"].shape == (4, 5)
    rows = [
        vocab_ids(f"the film good {EOS}"),
        vocab_ids(f"it was fine {EOS}"),
        vocab_ids(f"the film bad acting {EOS}"),
        vocab_ids(f"it was awful {EOS}"),
    ]
    for i, ids in enumerate(rows):
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["input_ids"][i, len(ids) :].eq(pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (5 - len(ids))
    # labels: IGNORE on the two prompt tokens and on padding, the completion tokens elsewhere
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX] + vocab_ids(f"good {EOS}") + [IGNORE_INDEX]
    assert batch["labels"][2].tolist() == [IGNORE_INDEX, IGNORE_INDEX] + vocab_ids(f"bad acting {EOS}")
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [2, 2, 3, 2]
    assert batch["labels"].dtype == torch.long
