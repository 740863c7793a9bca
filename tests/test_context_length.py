"""data.max_length beyond the model's context is one clear line before any compute, exit 2 (issue 15.12).

Before: a learned-position model (GPT-2, n_positions=128) raised a raw IndexError with status 1;
a RoPE model trained silently past its trained positions.
"""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel

from dpokit.cli import main
from dpokit.tiny import save_tiny
from tiny_assets import WORDS, synthetic_pairs, tiny_model_dir, word_tokenizer, write_jsonl


def _long_pairs(n_words: int) -> list[dict]:
    """Pairs whose prompt alone is n_words tokens (a word-level tokenizer: one word, one token)."""
    words = [w for w in WORDS if w.isalpha()]
    text = lambda k, s: " ".join(words[(i * 7 + s) % len(words)] for i in range(k))  # noqa: E731
    return [{"prompt": text(n_words, i), "chosen": text(8, i + 1), "rejected": text(8, i + 2)} for i in range(8)]


def _gpt2_dir(tmp_path, n_positions: int = 128):
    tokenizer = word_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return save_tiny(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2")


def _train(tmp_path, model_dir, max_length: int, capsys, rows=None) -> tuple[int, str]:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows or synthetic_pairs(16, seed=0))
    code = main(
        [
            "train",
            "demo",
            f"model.name_or_path={model_dir}",
            f"data.path={data}",
            "data.eval_path=null",
            f"data.max_length={max_length}",
            f"data.max_prompt_length={max_length // 2 + max_length // 4}",
            "train.max_steps=1",
            "train.progress_bar=false",
            f"out_dir={tmp_path / 'run'}",
        ]
    )
    return code, capsys.readouterr().err


def test_learned_positions_past_the_context_stop_with_one_line(tmp_path, capsys):
    code, err = _train(tmp_path, _gpt2_dir(tmp_path), 256, capsys, _long_pairs(150))
    assert code == 2 and "exceeds the model's context length of 128 tokens" in err and "data.max_length <= 128" in err
    assert "Traceback" not in err and "IndexError" not in err


def test_a_rope_model_past_its_positions_stops_too(tmp_path, capsys):
    code, err = _train(tmp_path, tiny_model_dir(), 2048, capsys, _long_pairs(600))  # the tiny Llama's context: 512
    assert code == 2 and "max_position_embeddings" in err and "the longest row is" in err


def test_a_max_length_past_the_context_trains_when_every_row_fits(tmp_path, capsys):
    """The default max_length (1024) with a 512-position model and short rows: nothing passes the context."""
    code, err = _train(tmp_path, tiny_model_dir(), 1024, capsys)
    assert code == 0, err
