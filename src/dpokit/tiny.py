"""Tiny tokenizers and models built locally, for tests, the demo and offline trials.

Nothing here downloads anything: a tokenizer is trained with the `tokenizers`
library on a corpus you pass in, and a model is a small Llama built from a
`transformers` config with random weights. Both save in HF format, so every
loading path in dpokit (``from_pretrained`` on a folder) is exercised exactly as
it is for a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# A ChatML-style template, like Qwen's: each turn ends with the end-of-turn token,
# which is also the tokenizer's EOS, so every assistant completion ends with EOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same ChatML with tool use, in the style of Qwen2.5's template: `tools` are rendered as JSON lines
# inside <tools></tools> in the system turn, an assistant's `tool_calls` as <tool_call>{json}</tool_call>,
# and a `tool` message as a user turn holding <tool_response>...</tool_response>.
TOOLS_CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n\nYou may call one or more functions.\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' + (tool | tojson) }}{%- endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- if not loop.first or message['content'] %}{{ '\n' }}{%- endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{ call['function']['arguments'] | tojson }}{{ '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"]


def build_tokenizer(
    corpus: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 512,
    chat_template: str | None = CHATML_TEMPLATE,
):
    """Train a small fast tokenizer on `corpus` and wrap it for `transformers`.

    kind="bpe": byte-level BPE (any text round-trips, like GPT-2/Llama 3 tokenizers).
    kind="word": one token per whitespace-separated word (used by the demo, whose
    language is a closed vocabulary, so a token is a word and a sample is readable).

    Special tokens: pad=<pad>, bos=<s>, eos=<|im_end|>, plus <|im_start|> for the
    chat template. BOS is not added automatically (as with Qwen), so a text prompt
    tokenises to exactly its own tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'bpe' or 'word'")
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
):
    """A randomly initialised LlamaForCausalLM sized for CPU tests (~100k parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny(model, tokenizer, path: str | Path) -> Path:
    """Save a model and tokenizer as a HF folder that `from_pretrained` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
