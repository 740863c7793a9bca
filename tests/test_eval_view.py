"""One view: `dpokit eval --suite ...` writes a JSON and a markdown table, and `dpokit report` shows it."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from dpokit.cli import main
from dpokit.report.eval_table import eval_section, markdown, rows
from dpokit.tiny import build_tiny_llama, build_tokenizer, save_tiny
from tiny_assets import WORDS, tiny_model_dir, write_jsonl


def _judge_dir() -> Path:
    tokenizer = build_tokenizer([" ".join([*WORDS, "A", "B"])], kind="word")
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    return save_tiny(model, tokenizer, Path(tempfile.mkdtemp(prefix="dpokit-judge-")) / "judge")


def test_eval_suites_offline_with_a_local_judge_write_the_view_and_the_report_shows_it(tmp_path, capsys):
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "the film was"}, {"prompt": "it is"}, {"prompt": "the plot"}]
    )
    policy, reference = str(tiny_model_dir(seed=0)), str(tiny_model_dir(seed=1))
    run = tmp_path / "run"
    out = run / "eval.json"
    assert (
        main(
            [
                "eval",
                "--policy",
                policy,
                "--reference",
                reference,
                "--prompts",
                str(prompts),
                "--local-judge",
                str(_judge_dir()),
                "--suite",
                "ifeval",
                "--suite",
                "lc_winrate",
                "--suite",
                "multiturn",
                "--multiturn-mode",
                "pairwise",
                "--max-prompts",
                "3",
                "--suite-max-new-tokens",
                "6",
                "-n",
                "2",
                "--max-new-tokens",
                "4",
                "--lc-bootstrap",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    suites = m["suites"]
    assert set(suites) == {"ifeval", "lc_winrate", "multiturn"} and m["win_rate_by"].startswith("local judge")
    assert suites["ifeval"]["policy"]["num_prompts"] == 3 and "inst_level_loose_acc" in suites["ifeval"]["baseline"]
    lc = suites["lc_winrate"]
    assert lc["num_judgments"] == 6 and lc["num_prompts"] == 3 and 0 <= lc["lc_win_rate"] <= 1
    assert lc["raw_win_rate"] == m["win_rate"]  # the same judgments as the sampled win rate
    assert suites["multiturn"]["num_questions"] == 3 and 0 <= suites["multiturn"]["win_rate"] <= 1
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| suite | metric | policy | baseline |")
    assert "| ifeval | prompt-level strict |" in table and "| lc_winrate | length-controlled win rate |" in table
    assert "| multiturn | turn 2 win rate |" in table and "| samples | win rate vs baseline |" in table
    assert "length-controlled win rate" in capsys.readouterr().out
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert '<section id="evaluation">' in page and "length-controlled win rate" in page


def test_rows_put_policy_and_baseline_side_by_side_with_standard_errors():
    metrics = {
        "mean_length": 10.0,
        "mean_length_sem": 0.5,
        "baseline_mean_length": 8.0,
        "win_rate": 0.75,
        "win_rate_sem": 0.1,
        "suites": {
            "ifeval": {
                "policy": {"prompt_level_strict_acc": 0.5, "prompt_level_strict_acc_sem": 0.25},
                "baseline": {"prompt_level_strict_acc": 0.25, "prompt_level_strict_acc_sem": math.nan},
            },
            "multiturn": {"policy": {"score": 6.0, "score_sem": 1.5, "parse_failures": 2}, "baseline": None},
        },
    }
    assert rows(metrics) == [
        ("samples", "win rate vs baseline", "75.0% ± 10.0%", ""),
        ("samples", "mean length (tokens)", "10.0 ± 0.5", "8.0"),
        ("ifeval", "prompt-level strict", "50.0% ± 25.0%", "25.0%"),
        ("multiturn", "score (1-10)", "6.00 ± 1.50", ""),
        ("multiturn", "judge parse failures", "2", ""),
    ]
    assert "| ifeval | prompt-level strict | 50.0% ± 25.0% | 25.0% |" in markdown(metrics)
    kl = markdown({"kl_to_reference": 1.5})
    assert (
        "| samples | KL(policy \\|\\| reference), nats, k3 of the sampled log-ratio | 1.50 |  |" in kl
    )  # escaped: 4 columns, not 6


def test_a_run_without_eval_json_has_no_section_and_a_broken_one_says_so(tmp_path):
    assert eval_section(tmp_path) == ""
    (tmp_path / "eval.json").write_text("{not json")
    assert "could not be read" in eval_section(tmp_path)


def test_multiturn_single_mode_through_the_cli_with_a_local_api_judge(tmp_path):
    from test_multiturn_judge import MTJudgeServer

    model = str(tiny_model_dir(seed=0))
    out = tmp_path / "eval.json"
    with MTJudgeServer() as server:
        assert (
            main(
                [
                    "eval",
                    "--policy",
                    model,
                    "--reference",
                    str(tiny_model_dir(seed=1)),
                    "--judge-url",
                    server.url,
                    "--judge-model",
                    "judge",
                    "--suite",
                    "multiturn",
                    "--max-prompts",
                    "2",
                    "--suite-max-new-tokens",
                    "4",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    assert len(server.requests) == 8  # 2 questions x 2 turns x (policy, baseline)
    result = json.loads(out.read_text())["suites"]["multiturn"]
    for side in ("policy", "baseline"):  # the seeded tiny models' greedy answers have no "great": every turn rated 3
        assert (
            result[side]["turn1_score"] == 3.0
            and result[side]["turn2_score"] == 3.0
            and result[side]["parse_failures"] == 0
        )
    assert "| multiturn | turn 1 score (1-10) | 3.00 ± 0.00 | 3.00 ± 0.00 |" in out.with_suffix(".md").read_text()


def test_a_suite_missing_its_judge_is_refused_before_any_model_loads(capsys):
    assert main(["eval", "--policy", "no/such/model", "--suite", "multiturn"]) == 2
    assert "multiturn single mode needs a judge" in capsys.readouterr().err
    assert main(["eval", "--policy", "no/such/model", "--prompts", "p.jsonl", "--suite", "lc_winrate"]) == 2
    assert "lc_winrate needs win-rate judgments" in capsys.readouterr().err


def test_the_table_shows_the_exact_kl_with_its_estimator_and_the_sampled_one_beside_it():
    # Issue 20: eval.md showed only the sampled k3 estimate (6.04 ± 5.23); the exact next-token KL (1.47 ± 0.15)
    # reached the console only.
    from dpokit.online.suites.view import markdown

    table = markdown(
        {"kl_to_reference": 6.04, "kl_to_reference_sem": 5.23, "kl_tokenwise": 1.47, "kl_tokenwise_sem": 0.15}
    )
    lines = [line for line in table.splitlines() if line.startswith("| samples | KL")]
    assert len(lines) == 2 and "exact next-token" in lines[0] and "1.47 ± 0.15" in lines[0]
    assert "k3" in lines[1] and "6.04 ± 5.23" in lines[1] and "same expectation" in table


def test_eval_names_the_missing_option_before_any_model_loads(capsys):
    # Issue 20: --suite lc_winrate with --prompts and --scorer but no --reference said "give --prompts and a judge
    # or --scorer" after sampling; what it lacks is a baseline to judge the policy's samples against.
    assert (
        main(["eval", "--policy", "no/such/model", "--prompts", "p.jsonl", "--scorer", "m:f", "--suite", "lc_winrate"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "lc_winrate needs a baseline" in err[0]
        and "--reference" in err[0]
        and "--scorer" not in err[0]
    )
    # --pairs without --reference: preference accuracy cannot be measured, which was left out without a word
    assert main(["eval", "--policy", "no/such/model", "--prompts", "p.jsonl", "--pairs", "pairs.jsonl"]) == 2
    assert "--pairs needs --reference" in capsys.readouterr().err


def test_eval_suite_keys_are_checked_and_a_pipeline_refuses_suites_it_would_not_run():
    import pytest

    from dpokit.config import ConfigError, EvalConfig
    from dpokit.config.loading import load_pipeline_config

    from dpokit.online.suites.runner import check_suite_names, run_suites

    assert EvalConfig().suites == [] and EvalConfig().multiturn_mode == "single"
    with pytest.raises(ConfigError, match="did you mean 'ifeval'"):  # the names are the suite table's (runner.SUITES)
        check_suite_names(["ifevl"])
    with pytest.raises(ConfigError, match="did you mean 'ifeval'"):  # refused before any model runs
        run_suites(["ifevl"], policy=None, tokenizer=None, cfg=EvalConfig(suites=["ifevl"]))
    with pytest.raises(ConfigError, match="eval.lc_bootstrap"):
        EvalConfig(lc_bootstrap=-1)
    with pytest.raises(ConfigError, match="'eval.suites' is for `dpokit eval --suite ...` only"):
        load_pipeline_config({"policy": "p", "prompts": "q", "scorer": "a:b", "eval": {"suites": ["ifeval"]}})
