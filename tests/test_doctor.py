"""`dpokit doctor`: each check fires on data crafted to trip it, and stays quiet on clean data."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from dpokit.doctor import DoctorConfig, format_report, run_doctor
from dpokit.tiny import CHATML_TEMPLATE
from tiny_assets import synthetic_pairs, tiny_model_dir, vocab_ids, word_tokenizer, write_jsonl

SHORT = ["data.max_length=32", "data.max_prompt_length=16"]


class BiasedLM(torch.nn.Module):
    """A stand-in causal LM whose next-token distribution is the same fixed one at every position.

    Giving some words high logits makes their log-probs, and so the reference's
    preference between two completions, exactly predictable.
    """

    def __init__(self, favoured: dict[str, float]):
        super().__init__()
        bias = torch.zeros(len(word_tokenizer()))
        for word, logit in favoured.items():
            bias[vocab_ids(word)[0]] = logit
        self.bias = torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


PLAUSIBLE = BiasedLM({"good": 5.0, "bad": 4.0, "<|im_end|>": 5.0, "fine": 5.0, "plot": 5.0, "acting": 5.0, "very": 5.0})


def _conversation(question: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _doctor(tmp_path, rows, tokenizer=None, reference_model=None, overrides=SHORT, **kwargs):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    return run_doctor(
        str(path), overrides=list(overrides), tokenizer=tokenizer, reference_model=reference_model, **kwargs
    )


def _tokenizer_with(template: str | None = None, add_bos: bool = False):
    tokenizer = copy.deepcopy(word_tokenizer())
    if template is not None:
        tokenizer.chat_template = template
    if add_bos:
        tokenizer.add_bos_token = True  # Llama/Mistral-style: BOS prepended to every encoded text
    return tokenizer


# --- clean data -------------------------------------------------------------------------------


def test_clean_text_data_passes_every_check(tmp_path):
    report = _doctor(tmp_path, synthetic_pairs(40, seed=1), word_tokenizer(), PLAUSIBLE)
    verdicts = {c.name: c.verdict for c in report.checks}
    assert set(verdicts.values()) <= {"ok", "skip"}, verdicts
    assert verdicts["template_prefix"] == "skip"  # text rows: no chat template involved
    assert report.verdict == "ok"
    assert "What to do" not in format_report(report)


def test_clean_conversational_data_passes_the_template_checks(tmp_path):
    rows = [_conversation("what colour sky", "blue", "green"), _conversation("how are you", "i am fine thanks", "no")]
    report = _doctor(tmp_path, rows, word_tokenizer(), sample_size=0)
    for name in ("template_prefix", "special_tokens", "completion_end", "truncation", "dropped_rows"):
        assert report.check(name).verdict == "ok", format_report(report)


def test_without_a_model_token_and_reference_checks_are_skipped_with_a_note(tmp_path):
    report = _doctor(tmp_path, synthetic_pairs(10, seed=1))
    assert {report.check(n).verdict for n in ("truncation", "template_prefix", "reference_logps")} == {"skip"}
    assert report.check("length_bias").numbers["unit"] == "words"
    assert report.verdict == "ok" and "no model given" in report.notes[0]


# --- row-level checks -------------------------------------------------------------------------


def test_unusable_file_is_one_failing_load_check(tmp_path):
    report = _doctor(tmp_path, [{"question": "x"}, {"foo": 1}])
    assert [c.name for c in report.checks] == ["load"] and report.verdict == "fail"
    assert "no usable rows" in report.check("load").summary


def test_dropped_rows_are_counted_by_reason(tmp_path):
    rows = synthetic_pairs(6, seed=1) + [
        {"prompt": "the film", "chosen": " good"},
        {"prompt": "it", "chosen": " ", "rejected": " bad"},
    ]
    check = _doctor(tmp_path, rows, word_tokenizer(), sample_size=0).check("dropped_rows")
    assert check.verdict == "warn" and check.numbers["dropped"] == 2
    assert set(check.numbers["by_reason"]) == {"rejected is missing", "chosen is empty or whitespace-only"}
    assert any(":7" in where for where in check.examples)


def test_mixed_text_and_conversational_rows_warn(tmp_path):
    check = _doctor(tmp_path, synthetic_pairs(3, seed=1) + [_conversation("hi", "hello", "no")]).check("layouts")
    assert check.verdict == "warn" and check.numbers["layouts"] == {"prompt_chosen_rejected": 4}
    assert check.numbers["conversational_rows"] == 1


def test_identical_chosen_and_rejected_are_flagged(tmp_path):
    rows = synthetic_pairs(8, seed=1) + [{"prompt": "the film", "chosen": " good plot", "rejected": "good  plot "}]
    check = _doctor(tmp_path, rows).check("identical_pairs")
    assert check.verdict == "warn" and check.numbers["identical"] == 1 and check.examples[0].endswith(":9")


def test_duplicate_and_contradictory_pairs_are_flagged(tmp_path):
    pair = {"prompt": "the film", "chosen": " good", "rejected": " bad"}
    swapped = {"prompt": "the film", "chosen": " bad", "rejected": " good"}
    check = _doctor(tmp_path, [pair, pair, swapped, {"prompt": "it", "chosen": " fine", "rejected": " awful"}]).check(
        "duplicates"
    )
    assert check.verdict == "warn"
    assert check.numbers == {
        "distinct_prompts": 2,
        "repeated_prompts": 2,
        "duplicate_pairs": 1,
        "contradictory_pairs": 3,
    }
    assert "label_smoothing=0.1" in check.advice


def test_repeated_prompts_do_not_warn_now_that_eval_holds_out_whole_prompts(tmp_path):
    rows = [
        {"prompt": "the film", "chosen": " good", "rejected": " bad"},
        {"prompt": "the film", "chosen": " fine", "rejected": " awful"},
    ]
    assert _doctor(tmp_path, rows).check("duplicates").verdict == "ok"
    held_out = _doctor(tmp_path, rows, overrides=SHORT + ["data.eval_fraction=0.5"]).check("duplicates")
    assert held_out.verdict == "ok" and held_out.numbers["repeated_prompts"] == 1


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_planted_length_bias_is_flagged(tmp_path, with_tokenizer):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"] + " very good plot and acting", "rejected": r["rejected"]}
            for r in synthetic_pairs(20, seed=3)]  # fmt: skip
    check = _doctor(tmp_path, rows, word_tokenizer() if with_tokenizer else None, sample_size=0).check("length_bias")
    assert check.verdict == "warn" and check.numbers["share_chosen_longer"] == 1.0
    assert check.numbers["mean_ratio"] > 1.3 and "simpo" in check.advice


# --- tokenizer checks -------------------------------------------------------------------------


def test_truncation_rate_at_the_configured_limits(tmp_path):
    long_prompt = " ".join(["the film was"] * 6)  # 18 tokens
    rows = [{"prompt": long_prompt, "chosen": " good " + "very " * 20, "rejected": " bad"}] * 3 + synthetic_pairs(
        3, seed=1
    )
    check = _doctor(tmp_path, rows, word_tokenizer(), sample_size=0).check("truncation")
    assert check.numbers["share"] == {"prompt": 0.5, "chosen": 0.5, "rejected": 0.0}
    assert check.verdict == "warn" and check.numbers["p99_total_tokens"] == 18 + 22
    assert "data.max_length=40" in check.advice


def test_truncation_advice_stays_within_the_model_s_context(tmp_path):
    # Issue 20: the doctor suggested data.max_length=2855 for a model whose context is 2048.
    from dpokit.tiny import build_tiny_llama

    long_prompt = " ".join(["the film was"] * 6)  # 18 tokens
    rows = [{"prompt": long_prompt, "chosen": " good " + "very " * 20, "rejected": " bad"}] * 3 + synthetic_pairs(
        3, seed=1
    )
    small = build_tiny_llama(word_tokenizer(), hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=32)
    report = _doctor(tmp_path, rows, word_tokenizer(), reference_model=small, sample_size=0)
    check = report.check("truncation")
    assert check.numbers["p99_total_tokens"] == 40 and check.numbers["context_length"] == 32
    assert "data.max_length=40" not in check.advice and "data.max_length=32" in check.advice
    assert "context" in check.advice and "filter out the longest rows" in check.advice


def test_template_whose_prompt_render_is_not_a_prefix_fails(tmp_path):
    # A default system turn added only when the conversation does not end with the assistant: the prompt render
    # (ending with the user turn) then starts differently from the full conversation.
    template = (
        "{% if messages[-1]['role'] != 'assistant' %}{{ '<|im_start|>system\nhi<|im_end|>\n' }}{% endif %}"
        + CHATML_TEMPLATE
    )
    report = _doctor(
        tmp_path, [_conversation("what colour sky", "blue", "green")] * 2, _tokenizer_with(template), sample_size=0
    )
    check = report.check("template_prefix")
    assert check.verdict == "fail" and check.numbers["not_prefix"] == 2
    assert "at token 1" in check.summary and report.verdict == "fail"


def test_end_of_turn_already_in_the_completion_text_is_doubled(tmp_path):
    rows = [
        _conversation("what colour sky", "blue<|im_end|>", "green"),  # the template adds a second <|im_end|>
        {"prompt": "the film", "chosen": " good<|im_end|>\n", "rejected": " bad"},
    ]  # dpokit appends EOS after "\n"
    check = _doctor(tmp_path, rows, word_tokenizer(), sample_size=0).check("special_tokens")
    assert check.verdict == "warn" and check.numbers["doubled_eos"] == 2 and check.numbers["doubled_bos"] == 0
    assert check.examples == ["%s:1 (chosen)" % (tmp_path / "data.jsonl"), "%s:2 (chosen)" % (tmp_path / "data.jsonl")]


def test_bos_in_pre_rendered_prompt_text_is_doubled_by_a_bos_adding_tokenizer(tmp_path):
    tokenizer = _tokenizer_with(add_bos=True)
    assert tokenizer("<s> the film")["input_ids"][:2] == vocab_ids("<s> <s>")  # the real mechanism
    rows = [
        {"prompt": "<s> the film was", "chosen": " good", "rejected": " bad"},
        {"prompt": "it is", "chosen": " fine", "rejected": " awful"},
    ]
    check = _doctor(tmp_path, rows, tokenizer, sample_size=0).check("special_tokens")
    assert check.verdict == "warn" and check.numbers["doubled_bos"] == 1 and "remove BOS" in check.advice


def test_template_that_leaves_the_last_assistant_turn_open_misses_eos(tmp_path):
    open_last_turn = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{% if not (loop.last and message['role'] == 'assistant') %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    report = _doctor(
        tmp_path, [_conversation("what colour sky", "blue", "green")], _tokenizer_with(open_last_turn), sample_size=0
    )
    check = report.check("completion_end")
    assert check.verdict == "warn" and check.numbers == {"missing_end": 2, "completions": 2}


def test_conversational_rows_and_a_tokenizer_without_template_fail_like_training_would(tmp_path):
    no_template = copy.deepcopy(word_tokenizer())
    no_template.chat_template = None
    check = _doctor(tmp_path, [_conversation("hi", "hello", "no")], no_template).check("tokenisation")
    assert check.verdict == "fail" and "chat template" in check.summary


# --- reference-model checks -------------------------------------------------------------------


def test_reference_checks_on_the_tiny_model(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", synthetic_pairs(30, seed=2))
    report = run_doctor(str(path), model=str(tiny_model_dir()), overrides=SHORT, sample_size=12)
    logps, preference = report.check("reference_logps"), report.check("reference_preference")
    assert logps.numbers["pairs"] == 12 and preference.numbers["pairs"] == 12
    for value in (logps.numbers["mean_chosen"], logps.numbers["mean_rejected"], preference.numbers["share_wrong_way"]):
        assert math.isfinite(value)
    assert logps.numbers["mean_chosen"] < 0 and logps.verdict in ("ok", "warn")
    assert any("sample of 12 of 30" in note for note in report.notes)


def test_reference_that_prefers_rejected_hints_at_label_noise(tmp_path):
    prefers_bad = BiasedLM({"bad": 6.0, "<|im_end|>": 4.0})
    check = _doctor(tmp_path, synthetic_pairs(20, seed=4), word_tokenizer(), prefers_bad).check("reference_preference")
    assert check.verdict == "warn" and check.numbers["share_wrong_way"] == 1.0
    assert len(check.examples) == 5 and "label_smoothing" in check.advice


def test_completions_the_reference_finds_unlikely_warn_of_distribution_shift(tmp_path):
    elsewhere = BiasedLM({"maybe": 8.0})  # the reference would write "maybe" forever; the data never does
    check = _doctor(tmp_path, synthetic_pairs(20, seed=4), word_tokenizer(), elsewhere).check("reference_logps")
    assert check.verdict == "warn" and check.numbers["mean_chosen"] < -7
    assert "on-policy" in check.advice


def test_thresholds_are_adjustable(tmp_path):
    strict = DoctorConfig(min_token_logp=-0.01)
    check = _doctor(tmp_path, synthetic_pairs(10, seed=1), word_tokenizer(), PLAUSIBLE, thresholds=strict).check(
        "reference_logps"
    )
    assert check.verdict == "warn"


# --- output -----------------------------------------------------------------------------------


def test_table_and_json_carry_verdicts_numbers_and_advice(tmp_path):
    rows = [
        {"prompt": "the film", "chosen": " good very good plot", "rejected": " bad"}
    ] * 8  # 8 of 8 longer: sign test p < 0.01
    report = _doctor(tmp_path, rows)
    text = format_report(report)
    assert "length_bias" in text and "WARN" in text and "What to do:" in text and "overall: WARN" in text
    data = json.loads(report.to_json())
    assert data["verdict"] == "warn"
    assert {c["name"]: c["verdict"] for c in data["checks"]}["length_bias"] == "warn"
    assert data["checks"][0]["numbers"]["layouts"] == {"prompt_chosen_rejected": 8}


def test_cli_doctor_verb(tmp_path, capsys):
    """Runs once the `doctor` verb is in cli.py: exit 0 on warnings, 1 on a failing check, JSON on request."""
    from dpokit.cli import build_parser, main

    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    if "doctor" not in verbs:
        pytest.skip("the doctor verb is not in cli.py yet")
    rows = [{"prompt": "the film", "chosen": " good very good plot", "rejected": " bad"}] * 8
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    assert main(["doctor", str(data), "data.max_length=8", "data.max_prompt_length=4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "warn"
    assert main(["doctor", str(write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}]))]) == 1
    assert "overall: FAIL" in capsys.readouterr().out


def test_length_bias_follows_the_typical_pair_not_a_few_outliers(tmp_path):
    """hh-rlhf's shape: chosen shorter in 56% of pairs (ratio ~0.84), a few huge chosen drive the mean ratio up."""
    from dpokit.doctor.text_checks import length_bias_check

    chosen, rejected = [84] * 56 + [100] * 24 + [2000] * 20, [100] * 56 + [84] * 24 + [100] * 20
    check = length_bias_check(chosen, rejected, "tokens", DoctorConfig())
    assert check.numbers["mean_ratio"] > 1.3  # what the old check judged: "chosen systematically longer"
    assert check.verdict == "ok" and check.numbers["median_ratio"] == pytest.approx(0.84)
    assert check.numbers["share_chosen_shorter"] == 0.56 and check.numbers["sign_test_p"] > 0.05
    biased = length_bias_check([84] * 80 + [2000] * 20, [100] * 100, "tokens", DoctorConfig())
    assert biased.verdict == "warn" and "systematically shorter" in biased.advice  # 80% shorter, despite the mean


def test_sign_test_matches_the_binomial_by_hand():
    from dpokit.doctor.text_checks import sign_test_p

    assert sign_test_p(4, 4) == pytest.approx(2 / 16)  # 4 of 4 one way: P = 2 * (1/2)^4
    assert sign_test_p(1, 4) == pytest.approx(2 * 5 / 16)  # at least 3 of 4 either way
    assert sign_test_p(50, 100) == 1.0
    assert sign_test_p(1200, 2000) == pytest.approx(
        2 * 0.5 * math.erfc((1200 - 0.5 - 1000) / math.sqrt(500) / math.sqrt(2))
    )


def test_long_paths_are_never_broken_across_lines(tmp_path):
    deep = tmp_path / "a-very-long-folder-name-with-hyphens" / ("x" * 70) / "more-hyphenated-parts-here"
    deep.mkdir(parents=True)
    report = _doctor(deep, [{"foo": 1}])  # the failing load check's summary quotes the file's path
    assert report.check("load").verdict == "fail"
    lines = format_report(report, width=60).splitlines()
    path = str(deep / "data.jsonl")
    assert any(path in line for line in lines[1:]), lines  # whole on one line of the table, so it can be pasted
