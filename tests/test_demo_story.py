"""Issue 15.13, 15.17, 15.18: progress bars on the long phases, `dpokit eval --max-pairs`, a KL that is never
negative and says which estimator it is, report.html from the Python API, and distinct before/after samples."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import dpokit
import dpokit.report
from dpokit.config import EvalConfig, SpeedConfig
from dpokit.demo import world
from dpokit.online.demo_eval import evaluate_policy, format_table
from dpokit.online.eval_metrics import format_report
from dpokit.online.evaluation import evaluate, k3_kl
from dpokit.ref_cache.build import compute_reference_logps
from tiny_assets import model, synthetic_pairs, tiny_model_dir, tokenizer, write_jsonl  # noqa: F401 (model, tokenizer: fixtures)


# --- 15.18: a KL estimate that is never negative --------------------------------------------------


def test_k3_is_non_negative_where_the_plain_mean_is_negative():
    """Hand-worked: log pi/ref = (-0.5, 0.1, 0.2) has mean -0.0667 (k1 < 0); k3 = e^{-x} - 1 + x per sample:
    e^{0.5} - 1 - 0.5 = 0.148721, e^{-0.1} - 1 + 0.1 = 0.004837, e^{-0.2} - 1 + 0.2 = 0.018731; mean 0.057430."""
    log_ratio = torch.tensor([-0.5, 0.1, 0.2])
    assert log_ratio.mean().item() < 0
    per_sample = k3_kl(log_ratio)
    torch.testing.assert_close(
        per_sample, torch.tensor([0.148721, 0.004837, 0.018731], dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert per_sample.mean().item() == pytest.approx(0.057430, abs=1e-6)
    assert k3_kl(torch.zeros(4)).tolist() == [0.0] * 4  # the same model: exactly 0
    assert (k3_kl(torch.linspace(-1e-8, 1e-8, 101)) >= 0).all()  # rounding never makes it negative


def test_k3_is_unbiased():
    """Two Bernoullis, pi = (0.3, 0.7), ref = (0.6, 0.4): the exact E_pi[k3] is KL(pi || ref)."""
    pi, ref = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.tensor([0.6, 0.4], dtype=torch.float64)
    exact = (pi * (pi / ref).log()).sum()
    assert (pi * k3_kl((pi / ref).log())).sum().item() == pytest.approx(exact.item(), rel=1e-9)


def test_eval_kl_of_a_near_identical_policy_is_not_negative_and_names_its_estimator(model, tokenizer):
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a policy a hair away from its reference: the plain mean of log pi/ref is often < 0
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    m = evaluate(
        model,
        tokenizer,
        world.eval_prompts(8, seed=0),
        EvalConfig(num_samples=4, max_new_tokens=6, seed=3),
        reference=reference,
        baseline=None,
    )
    assert m["kl_to_reference"] >= 0 and m["kl_tokenwise"] >= 0
    assert "k3" in m["kl_estimator"]
    text = format_report(m)
    assert "k3 from the policy's samples" in text and "exact next-token KL" in text and "-0.0" not in text


# --- 15.13: --max-pairs and progress bars ----------------------------------------------------------


def test_cli_eval_max_pairs_uses_the_first_n_and_says_so(tmp_path, capsys):
    from dpokit.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the film was"}])
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": "the film was", "chosen": " great", "rejected": " dull"}] * 5
    )
    model, out = str(tiny_model_dir()), tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--policy",
                model,
                "--reference",
                model,
                "--prompts",
                str(prompts),
                "--pairs",
                str(pairs),
                "--max-pairs",
                "2",
                "-n",
                "2",
                "--max-new-tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    assert m["pairs_used"] == 2 and m["pairs_total"] == 5 and m["preference_accuracy"] == 0.0  # ties
    captured = capsys.readouterr()
    assert "(on 2 of 5 pairs)" in captured.out
    # the progress bars: count and time left, on stderr
    assert "[eval] sampling the policy" in captured.err and "2/2" in captured.err
    assert "[eval] held-out pairs" in captured.err and "4/4" in captured.err


def test_reference_cache_build_shows_a_progress_bar(tmp_path, capsys):
    from dpokit.config import load_config
    from dpokit.data.prepare import prepare_data
    from dpokit.models import load_policy, load_tokenizer

    path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(10, seed=3))
    cfg = load_config(
        None,
        {
            "model.name_or_path": str(tiny_model_dir()),
            "data.max_length": 32,
            "data.max_prompt_length": 16,
            "data.path": str(path),
            "data.eval_fraction": 0.0,
        },
    )
    tokenizer = load_tokenizer(cfg)
    pairs = prepare_data(cfg, tokenizer).train
    model = load_policy(cfg)
    capsys.readouterr()
    compute_reference_logps(
        model,
        pairs,
        SpeedConfig(),
        tokenizer.pad_token_id,
        batch_size=4,
        device="cpu",
        progress="[dpokit] reference log-probs (train)",
    )
    err = capsys.readouterr().err
    assert "[dpokit] reference log-probs (train)" in err and f"{len(pairs)}/{len(pairs)}" in err and "pair" in err
    compute_reference_logps(model, pairs, SpeedConfig(), tokenizer.pad_token_id, batch_size=4, device="cpu")
    assert capsys.readouterr().err == ""  # progress=None: silent, as before


# --- 15.17: the demo's story ------------------------------------------------------------------------


def test_before_and_after_samples_come_from_their_own_model_for_the_same_prompts(model, tokenizer, capsys):
    """The old demo sampled both models with seed 0: a policy that DPO barely changed then repeats the SFT
    samples word for word. A nearly unchanged policy must still show its own draws."""
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-4 * torch.randn_like(p))
    prompts = world.eval_prompts(6, seed=0)
    pairs = world.preference_pairs(4, seed=0, split="eval")
    before = evaluate_policy(
        model, model, tokenizer, prompts, pairs, num_samples=2, seed=0, max_new_tokens=8, progress="SFT"
    )
    after = evaluate_policy(
        policy, model, tokenizer, prompts, pairs, num_samples=2, seed=1, max_new_tokens=8, progress="DPO"
    )
    assert [p for p, _ in before["examples"]] == [p for p, _ in after["examples"]] == prompts[:3]  # the same prompts
    assert [c for _, c in before["examples"]] != [c for _, c in after["examples"]]  # but each model's own samples
    err = capsys.readouterr().err
    assert "[demo] SFT: sampling" in err and "12/12" in err and "[demo] DPO: held-out pairs" in err
    table = format_table(before, after)
    assert "KL(policy || SFT), nats [1]" in table and "k3" in table and "kl/chosen" in table
    for (prompt, sft), (_, dpo) in zip(before["examples"], after["examples"]):
        assert f"SFT: ...{sft}" in table and f"DPO: ...{dpo}" in table and prompt in table


def test_the_python_api_writes_report_html(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(16, seed=1))
    result = dpokit.train(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": {"path": str(train), "max_length": 32, "max_prompt_length": 16, "eval_fraction": 0.0},
            "train": {"batch_size": 8, "max_steps": 2, "logging_steps": 1, "progress_bar": False},
            "out_dir": str(tmp_path / "run"),
        }
    )
    assert (result.run_dir / "report.html").exists()
    assert f"[dpokit] report: {result.run_dir / 'report.html'}" in capsys.readouterr().out


def test_a_report_failure_is_one_warning_line_not_a_failed_run(tmp_path, monkeypatch, capsys):
    def broken(run_dir, out=None):
        raise ValueError("a bug in the report")

    monkeypatch.setattr(dpokit.report, "build_report", broken)
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(16, seed=1))
    result = dpokit.train(
        {
            "model": {"name_or_path": str(tiny_model_dir())},
            "data": {"path": str(train), "max_length": 32, "max_prompt_length": 16, "eval_fraction": 0.0},
            "train": {"batch_size": 8, "max_steps": 1, "logging_steps": 1, "progress_bar": False},
            "out_dir": str(tmp_path / "run"),
        }
    )
    assert (result.model_dir / "config.json").exists() and not (result.run_dir / "report.html").exists()
    warning = [line for line in capsys.readouterr().err.splitlines() if "could not write the report" in line]
    assert len(warning) == 1 and "ValueError: a bug in the report" in warning[0] and "dpokit report" in warning[0]


def test_the_report_names_its_kl_estimator():
    from dpokit.report.charts import PLOTS

    title = next(p for p in PLOTS if p.key == "kl").title
    assert "kl/chosen" in title and "exact over the chosen completion" in title
