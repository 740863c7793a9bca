"""`dpokit demo` end to end: the shipped config really aligns the demo's SFT model."""

import json

import pytest

from dpokit.cli import main as cli_main


@pytest.mark.slow
def test_demo_moves_positive_share_above_0_8_without_degenerating(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))  # a fresh machine: build the SFT model
    assert cli_main(["demo", "--out-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "SFT (before)" in out and "DPO (after)" in out
    report = json.loads((tmp_path / "run" / "demo_report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["positive_share"] < 0.6  # the SFT model writes mostly non-positive reviews
    assert after["positive_share"] > 0.8
    assert after["preference_accuracy"] > 0.9 > before["preference_accuracy"]
    # not degenerate: still the language's grammar, similar length, KL to the SFT model small
    assert after["well_formed_share"] >= 0.85
    assert 0.75 * before["mean_length"] < after["mean_length"] < 1.25 * before["mean_length"]
    assert 0 < after["kl_to_reference"] < 5
    # a second run reuses the cached SFT model
    assert cli_main(["demo", "--out-dir", str(tmp_path / "run2")]) == 0
    assert "ready in 0." in capsys.readouterr().out
