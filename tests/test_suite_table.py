"""The suites are one table (online/suites/runner.SUITES): a suite added there is a `--suite` choice, is checked
before any model loads, runs on the policy and the baseline, and shows in eval.md and in `dpokit report`."""

from __future__ import annotations

import json
import math

from dpokit.cli import main
from dpokit.online.suites import runner
from dpokit.online.suites.suite import Suite
from dpokit.report.eval_table import rows
from tiny_assets import tiny_model_dir


def _vocab_size(run) -> dict:
    return run.per_model(
        lambda m: {"vocab": m.config.vocab_size, "vocab_sem": math.nan, "tokens": run.cfg.suite_max_new_tokens}
    )


def test_a_suite_is_one_entry_of_the_table(tmp_path, monkeypatch, capsys):
    lacks = lambda args: None if args.reference else "vocab_size needs --reference (its baseline)"  # noqa: E731
    monkeypatch.setitem(
        runner.SUITES,
        "vocab_size",
        Suite("the models' vocabulary", _vocab_size, [("vocabulary", "vocab", "{:d}")], lacks),
    )
    assert main(["eval", "--policy", "no/such/model", "--suite", "vocab_size"]) == 2  # refused before any model loads
    assert "vocab_size needs --reference" in capsys.readouterr().err
    run = tmp_path / "run"
    out = run / "eval.json"
    assert (
        main(
            [
                "eval",
                "--policy",
                str(tiny_model_dir(seed=0)),
                "--reference",
                str(tiny_model_dir(seed=1)),
                "--suite",
                "vocab_size",
                "--suite-max-new-tokens",
                "7",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    vocab = m["suites"]["vocab_size"]["policy"]["vocab"]
    assert m["suites"]["vocab_size"] == {
        "policy": {"vocab": vocab, "vocab_sem": None, "tokens": 7},
        "baseline": {"vocab": vocab, "vocab_sem": None, "tokens": 7},
    }
    assert m["suite_rows"] == {"vocab_size": [["vocabulary", "vocab", "{:d}"]]}
    assert f"| vocab_size | vocabulary | {vocab} | {vocab} |" in out.with_suffix(".md").read_text()
    monkeypatch.delitem(runner.SUITES, "vocab_size")  # `dpokit report` reads the rows from eval.json, not the table
    assert main(["report", str(run)]) == 0
    assert (
        f"<td>vocab_size</td><td>vocabulary</td><td>{vocab}</td><td>{vocab}</td>" in (run / "report.html").read_text()
    )


def test_the_rows_eval_json_carries_are_shown_and_an_unknown_format_is_left_out():
    metrics = {
        "suites": {"new": {"policy": {"a": 0.5, "b": 2.0}}},
        "suite_rows": {"new": [["share", "a", "{:.1%}"], ["odd", "b", "{0.__class__}"]]},
    }
    assert rows(metrics) == [("new", "share", "50.0%", "")]
    old = {"suites": {"ifeval": {"policy": {"prompt_level_strict_acc": 0.5}}}}  # an eval.json from before suite_rows
    assert rows(old) == [("ifeval", "prompt-level strict", "50.0%", "")]


def test_suite_help_lists_every_suite_of_the_table(capsys):
    import pytest

    from dpokit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, suite in runner.SUITES.items():
        assert f"{name} ({suite.help})" in text
