"""Degenerate tokenization is refused before any compute (issue 16), and the doctor reports it.

The case seen: config.json says model_type qwen2, tokenizer.json is a word-level tokenizer;
transformers loads Qwen2Tokenizer, which ignores that vocabulary, so prompts became 0 tokens,
completions only EOS, and training "trained" with log-probs 0 and exit status 0.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dpokit.cli import main as cli_main
from dpokit.config import ConfigError, load_config
from dpokit.data.prepare import format_summary, prepare_data
from dpokit.data.records import DataError
from dpokit.data.token_health import (
    HealthRow,
    TokenHealth,
    context_length_problem,
    kept_share,
    measure_token_health,
    token_health_problems,
)
from dpokit.data.unpaired import prepare_unpaired
from dpokit.doctor import format_report, run_doctor
from dpokit.data.sft import prepare_sft
from dpokit.tiny import build_tokenizer
from tiny_assets import synthetic_pairs, tiny_model_dir, word_tokenizer, write_jsonl

# Prompts of whole words: a word-level vocabulary has them, Qwen2Tokenizer's byte-level BPE
# without merges finds only the single-letter entries ("a", "i") and drops the rest.
ROWS = [
    {"prompt": f"hello how are you {w}", "chosen": " good thanks", "rejected": " bad"}
    for w in "the film plot story sky time".split()
]


@functools.lru_cache(maxsize=None)
def qwen2_with_word_tokenizer() -> Path:
    """A tiny model folder whose config.json says qwen2 and whose tokenizer.json is word-level."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = word_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = Path(tempfile.mkdtemp(prefix="dpokit-qwen2-word-")) / "model"
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(tmp_path, model: Path, data: Path, **overrides) -> Path:
    cfg = {
        "model": {"name_or_path": str(model)},
        "out_dir": str(tmp_path / "run"),
        "data": {"path": str(data), "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 2, "progress_bar": False},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- the reported case, end to end ------------------------------------------------------------


def test_train_refuses_a_qwen2_config_with_a_word_level_tokenizer(tmp_path, capsys):
    data, config = (
        write_jsonl(tmp_path / "pairs.jsonl", ROWS),
        _config(tmp_path, qwen2_with_word_tokenizer(), data=tmp_path / "pairs.jsonl"),
    )
    capsys.readouterr()  # building the model folder prints progress bars
    assert cli_main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line
    assert str(data) in err[0] and "Qwen2Tokenizer" in err[0] and "model_type" in err[0]
    assert "decode(encode(text)) loses most of the text" in err[0]
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.safetensors"))


@pytest.mark.parametrize("verb", ["precompute", "sft"])
def test_precompute_and_sft_refuse_it_before_any_compute_too(tmp_path, capsys, verb):
    rows = ROWS if verb == "precompute" else [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = _config(tmp_path, qwen2_with_word_tokenizer(), data=data, speed__ref_cache_dir=str(tmp_path / "cache"))
    capsys.readouterr()
    assert cli_main([verb, str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(data) in err[0] and "Qwen2Tokenizer" in err[0], err
    assert not list(tmp_path.rglob("*.safetensors"))  # no cache, no model written


def test_doctor_fails_the_same_model_folder(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    report = run_doctor(str(data), model=str(qwen2_with_word_tokenizer()), sample_size=0)
    check = report.check("token_health")
    assert check.verdict == "fail" and "Qwen2Tokenizer" in check.advice, format_report(report)
    assert report.verdict == "fail"
    assert cli_main(["doctor", str(data), "--model", str(qwen2_with_word_tokenizer()), "--sample", "0"]) == 1
    assert "token_health" in capsys.readouterr().out


# --- unknown tokens ---------------------------------------------------------------------------


def _latin_only_tokenizer():
    return build_tokenizer(["the film was good bad and it is a movie"], kind="word")


GREEK = [{"prompt": f"η ταινία ήταν {w}", "chosen": " καλή", "rejected": " κακή"} for w in "α β γ δ ε ζ".split()]


def test_unknown_token_rate_fails_in_the_doctor_and_stops_training(tmp_path):
    data = write_jsonl(tmp_path / "greek.jsonl", GREEK)
    report = run_doctor(str(data), tokenizer=_latin_only_tokenizer(), sample_size=0, overrides=["data.max_length=32"])
    check = report.check("unknown_tokens")
    assert check.verdict == "fail" and check.numbers["unknown_token_rate"] > 0.5, format_report(report)
    with pytest.raises(DataError, match=r"of tokens are the unknown token \(data.max_unknown_token_rate=0.1;"):
        prepare_data(load_config({"data": {"path": str(data), "max_length": 32}}), _latin_only_tokenizer())


def test_max_unknown_token_rate_is_the_one_limit_of_training_and_the_doctor(tmp_path):
    """A user whose unknown tokens are expected raises data.max_unknown_token_rate; training and the doctor agree."""
    data = write_jsonl(tmp_path / "greek.jsonl", GREEK)
    overrides = ["data.max_length=32", "data.max_unknown_token_rate=1.0", "doctor.unknown_token_warn_rate=1.0"]
    report = run_doctor(str(data), tokenizer=_latin_only_tokenizer(), sample_size=0, overrides=overrides)
    assert report.check("unknown_tokens").verdict == "ok", format_report(report)
    prepared = prepare_data(
        load_config({"data": {"path": str(data), "max_length": 32, "max_unknown_token_rate": 1.0}}),
        _latin_only_tokenizer(),
    )
    assert prepared.summary["train"]["token_health"]["unknown_token_rate"] > 0.5
    with pytest.raises(ConfigError, match="data.max_unknown_token_rate"):
        load_config(None, ["data.max_unknown_token_rate=1.5"])
    with pytest.raises(ConfigError, match="doctor.unknown_token_warn_rate"):
        load_config(None, ["doctor.unknown_token_warn_rate=-0.1"])
    # A limit set below the doctor's warning level: the doctor fails what training refuses, it never says ok.
    strict = run_doctor(
        str(data),
        tokenizer=_latin_only_tokenizer(),
        sample_size=0,
        overrides=["data.max_length=32", "data.max_unknown_token_rate=0.001", "doctor.unknown_token_warn_rate=1.0"],
    )
    assert strict.check("unknown_tokens").verdict == "fail"


def test_clean_data_passes_and_the_summary_names_the_tokenizer(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20, seed=1))
    report = run_doctor(str(data), tokenizer=word_tokenizer(), sample_size=0, overrides=["data.max_length=32"])
    assert report.check("token_health").verdict == "ok" and report.check("unknown_tokens").verdict == "ok"
    prepared = prepare_data(
        load_config({"data": {"path": str(data), "max_length": 32, "eval_fraction": 0.2}}), word_tokenizer()
    )
    text = format_summary(prepared.summary)
    assert f"tokenizer: {type(word_tokenizer()).__name__}" in text
    assert "(layouts: )" not in text  # the eval split held out from the training rows has no layouts of its own
    assert prepared.summary["train"]["token_health"]["unknown_tokens"] == 0


@pytest.mark.parametrize("prepare", [prepare_unpaired, prepare_sft], ids=["kto", "sft"])
def test_unpaired_and_sft_preparations_refuse_it_too(tmp_path, prepare):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in GREEK]
    data = write_jsonl(tmp_path / "greek.jsonl", rows)
    cfg = load_config({"data": {"path": str(data), "max_length": 32}, "loss": {"type": "kto"}})
    with pytest.raises(DataError, match=r"greek\.jsonl.*degenerate tokenization"):
        prepare(cfg, _latin_only_tokenizer())
    clean = [
        {"prompt": "the film was", "completion": " good", "label": True},
        {"prompt": "it is", "completion": " bad", "label": True},
    ]
    ok = prepare(
        load_config(
            {
                "data": {"path": str(write_jsonl(tmp_path / "ok.jsonl", clean)), "max_length": 32},
                "loss": {"type": "kto"},
            }
        ),
        word_tokenizer(),
    )
    assert ok.summary["train"]["token_health"]["rows"] == 2


# --- the pure parts ---------------------------------------------------------------------------


def test_kept_share_counts_characters_back_ignoring_case_and_spaces():
    assert kept_share("The film", "the  film") == 1.0
    assert kept_share("the film was good", "ia") == pytest.approx(2 / 14)
    assert kept_share("   ", "") == 1.0


def test_each_finding_fires_past_its_threshold_only():
    healthy = TokenHealth(
        "T",
        rows=10,
        prompts_with_text=10,
        empty_prompts=5,
        completions_with_text=20,
        eos_only_completions=10,
        tokens=100,
        unknown_tokens=10,
        round_trip_texts=30,
        lossy_texts=15,
    )
    assert token_health_problems(healthy, 0.10) == []  # exactly at every threshold: not "most"
    broken = TokenHealth(
        "T",
        rows=10,
        prompts_with_text=10,
        empty_prompts=9,
        completions_with_text=20,
        eos_only_completions=20,
        tokens=100,
        unknown_tokens=11,
        round_trip_texts=30,
        lossy_texts=16,
    )
    assert token_health_problems(broken, 0.10) == [
        "90% of prompts tokenised to 0 tokens",
        "100% of completions tokenised to EOS/special tokens only",
        "11.0% of tokens are the unknown token (data.max_unknown_token_rate=0.1; raise it only if those tokens are expected)",
        "decode(encode(text)) loses most of the text in 53% of texts",
    ]


def test_empty_prompts_count_only_when_the_raw_prompt_had_text():
    tokenizer = word_tokenizer()
    eos = tokenizer.eos_token_id
    rows = [HealthRow("", [], [("good", [tokenizer.get_vocab()["good"], eos])]) for _ in range(4)]
    health = measure_token_health(rows, tokenizer)
    assert health.prompts_with_text == 0 and token_health_problems(health, 0.10) == []
    eos_only = [HealthRow("the film", [tokenizer.get_vocab()["the"]], [("good", [eos])]) for _ in range(4)]
    assert token_health_problems(measure_token_health(eos_only, tokenizer), 0.10) == [
        "100% of completions tokenised to EOS/special tokens only"
    ]


def test_context_length_problem_reads_the_model_config():
    assert context_length_problem(256, SimpleNamespace(max_position_embeddings=128)).startswith(
        "data.max_length=256 exceeds the model's context length of 128 tokens (max_position_embeddings"
    )
    assert context_length_problem(128, SimpleNamespace(max_position_embeddings=128)) is None
    assert "n_positions" in context_length_problem(2048, SimpleNamespace(n_positions=1024))
    assert context_length_problem(10**6, SimpleNamespace()) is None  # unknown: nothing to compare


def test_doctor_fails_a_max_length_beyond_the_models_context(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8, seed=1))
    model = tiny_model_dir()
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    over = run_doctor(str(data), model=str(model), sample_size=0, overrides=[f"data.max_length={context * 2}"])
    assert over.check("context_length").verdict == "fail" and f"<= {context}" in over.check("context_length").summary
    fits = run_doctor(str(data), model=str(model), sample_size=0, overrides=[f"data.max_length={context}"])
    assert fits.check("context_length").verdict == "ok"
