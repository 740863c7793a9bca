"""Every row layout, from the raw row to exact token ids and label masks (word-level vocab lookups)."""

import pytest

from dpokit.data.collate import collate_pairs
from dpokit.data.layouts import detect_layout, to_example
from dpokit.data.tokenization import tokenize_pairs
from dpokit.logprobs import IGNORE_INDEX
from tiny_assets import vocab_ids, word_tokenizer

EOS = "<|im_end|>"
CHAT_PROMPT = f"<|im_start|> user what colour sky {EOS} <|im_start|> assistant"

CASES = {
    "prompt_chosen_rejected": (
        {"prompt": "the film was", "chosen": " good", "rejected": " bad"},
        "the film was", f"good {EOS}", f"bad {EOS}",
    ),
    "conversational": (
        {
            "prompt": [{"role": "user", "content": "what colour sky"}],
            "chosen": [{"role": "assistant", "content": "blue"}],
            "rejected": [{"role": "assistant", "content": "green"}],
        },
        CHAT_PROMPT, f"blue {EOS}", f"green {EOS}",
    ),
    "implicit_prompt": (  # hh-rlhf: multi-turn, split on the last assistant turn
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant: i am good thanks",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you\n\nAssistant: no",
        },
        "Human: hi Assistant: hello Human: how are you Assistant:", f"i am good thanks {EOS}", f"no {EOS}",
    ),
    "sharegpt": (
        {
            "conversations": [{"from": "human", "value": "what colour sky"}],
            "chosen": {"from": "gpt", "value": "blue"},
            "rejected": {"from": "gpt", "value": "green"},
        },
        CHAT_PROMPT, f"blue {EOS}", f"green {EOS}",
    ),
    "openai": (
        {
            "input": {"messages": [{"role": "user", "content": "what colour sky"}]},
            "preferred_output": [{"role": "assistant", "content": "blue"}],
            "non_preferred_output": [{"role": "assistant", "content": "green"}],
        },
        CHAT_PROMPT, f"blue {EOS}", f"green {EOS}",
    ),
    "alpaca": (
        {"instruction": "what colour", "input": "sky", "chosen": "blue", "rejected": "green", "output": "x"},
        CHAT_PROMPT, f"blue {EOS}", f"green {EOS}",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_layout_to_exact_ids_and_labels(name):
    row, prompt, chosen, rejected = CASES[name]
    layout = detect_layout(row)
    example = to_example(row, layout, None, where=f"{name}.jsonl:1")
    (pair,), _ = tokenize_pairs([example], word_tokenizer(), max_length=64, max_prompt_length=48)
    assert pair.prompt_ids == vocab_ids(prompt)
    assert pair.chosen_ids == vocab_ids(chosen)
    assert pair.rejected_ids == vocab_ids(rejected)
    batch = collate_pairs([pair], word_tokenizer().pad_token_id)
    n_prompt = len(pair.prompt_ids)
    assert (batch["labels"][:, :n_prompt] == IGNORE_INDEX).all()  # the prompt never counts in the loss
    assert batch["labels"][0, n_prompt : n_prompt + len(pair.chosen_ids)].tolist() == pair.chosen_ids
    assert batch["labels"][1, n_prompt : n_prompt + len(pair.rejected_ids)].tolist() == pair.rejected_ids
