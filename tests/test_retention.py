"""The retention set (data.retention_path): retention/* at each evaluation, the forgetting detector, the report's
curve, and the reference's NLL computed once (live, LoRA adapters off, or cached beside the pair log-probs)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpokit
from dpokit.config import ConfigError, load_config
from dpokit.report import write_report
from dpokit.detectors import FailureDetectors
from dpokit.training.metrics import read_metrics
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl

RETENTION_ROWS = [
    {"prompt": "the film was", "completion": " very good and the plot is fine"},
    {"prompt": "tell me a story", "completion": " once upon a time"},
    {"prompt": "the acting", "completion": " is awful but the movie is great"},
]


def _config(tmp_path, **sections):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, seed=1))
    retention = write_jsonl(tmp_path / "retention.jsonl", RETENTION_ROWS[:3])
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(train), "max_length": 32, "max_prompt_length": 16, "retention_path": str(retention)},
        "loss": {"beta": 0.1},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "train": {
            "batch_size": 16,
            "max_steps": 6,
            "logging_steps": 3,
            "eval_steps": 3,
            "progress_bar": False,
            "save_steps": 0,
        },
        "speed": {"ref_cache": False},
        "out_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _completion_nll(model, tokenizer, rows) -> float:
    """Token-mean NLL of the completions, by hand: prompt + completion + EOS, loss on the completion and EOS tokens."""
    total, tokens = 0.0, 0
    for row in rows:
        ids = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        assert full[: len(ids)] == ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1].float(), -1)
        targets = torch.tensor(full[1:])
        token_logps = logp.gather(-1, targets[:, None])[:, 0][len(ids) - 1 :]
        total -= float(token_logps.sum())
        tokens += token_logps.numel()
    return total / tokens


def _retention_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "retention/nll" in r]


def test_retention_nll_is_logged_at_every_evaluation_against_the_reference(tmp_path):
    result = dpokit.train(_config(tmp_path))
    records = _retention_records(result.run_dir)
    assert [r["step"] for r in records] == [
        0,
        3,
        6,
    ]  # before the first step, at eval_steps, at the end (no eval pairs needed)
    model_dir = tiny_model_dir()
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected_ref = _completion_nll(reference, tokenizer, RETENTION_ROWS[:3])
    trained = _completion_nll(
        AutoModelForCausalLM.from_pretrained(result.model_dir).eval(), tokenizer, RETENTION_ROWS[:3]
    )
    for r in records:
        assert r["retention/nll_ref"] == pytest.approx(expected_ref, rel=1e-5)
        assert r["retention/nll_delta"] == pytest.approx(r["retention/nll"] - r["retention/nll_ref"], abs=1e-9)
    assert records[0]["retention/nll_delta"] == pytest.approx(0.0, abs=1e-5)  # the untrained policy is the reference
    assert records[-1]["retention/nll"] == pytest.approx(trained, rel=1e-4)  # the final model's NLL, by hand
    assert records[-1]["retention/nll_delta"] != pytest.approx(0.0, abs=1e-4)  # lr 1e-2 moved it
    assert result.metrics["retention/nll"] == records[-1]["retention/nll"]


def test_rows_that_cannot_be_scored_are_counted_not_dropped_silently(tmp_path, capsys):
    cfg = _config(tmp_path, train={"max_steps": 1, "eval_steps": 0})
    write_jsonl(tmp_path / "retention.jsonl", RETENTION_ROWS + [{"text_only": "x"}])  # the last row has no SFT layout
    cfg["data"]["retention_path"] = str(tmp_path / "retention.jsonl")
    dpokit.train(cfg)
    out = capsys.readouterr().out
    assert "retention set" in out and "3 examples" in out
    assert (
        "[data] retention: 4 rows read, 3 examples used, 1 dropped" in out
        and "dropped 1: unrecognised SFT layout" in out
    )  # the same skip report as every other input file ...
    section = json.loads((tmp_path / "run" / "data_summary.json").read_text())["retention"]  # ... and its own section
    assert (section["rows_read"], section["rows_used"], section["rows_skipped"]) == (4, 3, 1)
    assert list(section["skipped_by_reason"]) == [
        "unrecognised SFT layout (columns: text_only; expected prompt+completion or messages)"
    ]


def test_a_retention_file_with_no_usable_row_names_the_key(tmp_path):
    cfg = _config(tmp_path)
    write_jsonl(tmp_path / "bad.jsonl", [{"text_only": "hello"}])
    cfg["data"]["retention_path"] = str(tmp_path / "bad.jsonl")
    with pytest.raises(dpokit.data.records.DataError, match="data.retention_path"):
        dpokit.train(cfg)


LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.mark.parametrize("sections", [
    {"lora": LORA, "optim": {"lr": 5e-2}},  # live reference: the policy with its adapters off
    {"lora": LORA, "optim": {"lr": 5e-2}, "speed": {"ref_cache": True}},  # cached, scored with the adapters off
    {"train": {"task": "sft"}, "data": {"path": None}},  # no reference at all: the starting policy
], ids=["lora-live", "lora-cached", "sft-task"])  # fmt: skip
def test_the_reference_nll_is_the_starting_model_s_when_the_policy_is_the_reference(tmp_path, sections):
    cfg = _config(tmp_path, **{k: v for k, v in sections.items() if k != "data"})
    if "data" in sections:  # SFT on the retention rows themselves
        cfg["data"]["path"] = cfg["data"]["retention_path"]
    cfg["speed"]["ref_cache_dir"] = str(tmp_path / "cache")
    result = dpokit.train(cfg)
    records = _retention_records(result.run_dir)
    model_dir = tiny_model_dir()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected_ref = _completion_nll(base, AutoTokenizer.from_pretrained(model_dir), RETENTION_ROWS[:3])
    assert all(r["retention/nll_ref"] == pytest.approx(expected_ref, rel=1e-5) for r in records)
    assert records[-1]["retention/nll_delta"] != pytest.approx(0.0, abs=1e-4)  # training moved the policy


def test_reference_nll_is_cached_with_the_reference_cache_and_a_changed_file_invalidates_it(tmp_path, capsys):
    cache = tmp_path / "cache"
    cfg = _config(
        tmp_path, speed={"ref_cache": True, "ref_cache_dir": str(cache)}, train={"max_steps": 2, "eval_steps": 0}
    )
    first = _retention_records(dpokit.train(cfg).run_dir)
    assert "computed and cached in" in capsys.readouterr().out
    stored = list((cache / "retention").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["tokens"] > 0
    cfg["out_dir"] = str(tmp_path / "run2")
    second = _retention_records(dpokit.train(cfg).run_dir)
    assert "read from" in capsys.readouterr().out
    assert second[0]["retention/nll_ref"] == first[0]["retention/nll_ref"]
    assert first[0]["retention/nll_delta"] == pytest.approx(0.0, abs=1e-5)  # the cached value is the reference's
    write_jsonl(tmp_path / "retention.jsonl", RETENTION_ROWS[:2])  # another retention file: another key
    cfg["out_dir"] = str(tmp_path / "run3")
    third = _retention_records(dpokit.train(cfg).run_dir)
    assert "computed and cached in" in capsys.readouterr().out
    assert len(list((cache / "retention").glob("*.json"))) == 2
    assert third[0]["retention/nll_ref"] != pytest.approx(first[0]["retention/nll_ref"])


# --- the forgetting detector --------------------------------------------------------------------


def _record(step, ref, delta):
    return {"step": step, "retention/nll": ref + delta, "retention/nll_ref": ref, "retention/nll_delta": delta}


def test_forgetting_fires_above_both_limits_once_with_evidence_and_mitigations():
    detectors = FailureDetectors()  # defaults: 0.3 nats/token and 20% of the reference's NLL
    assert detectors.update(_record(0, 1.5, 0.0)) == []
    assert detectors.update(_record(25, 1.5, 0.29)) == []  # under 0.3 (20% of 1.5 is 0.3 too)
    fired = detectors.update(_record(50, 1.5, 0.31))
    assert [d.mode for d in fired] == ["forgetting"] and fired[0].severity == "warn" and fired[0].step == 50
    assert "0.310 nats per token" in fired[0].evidence and "1.810 vs reference 1.500" in fired[0].evidence
    for advice in ("loss.beta", "optim.lr", "lora.enabled", "train.epochs", "data.sft_mix_path"):
        assert advice in fired[0].mitigation
    assert detectors.update(_record(75, 1.5, 0.5)) == []  # fires once while it holds
    assert detectors.update({"step": 80, "loss": 0.3}) == []  # a train record leaves it alone
    assert detectors.update(_record(100, 1.5, 0.1)) == []  # cleared ...
    assert [d.mode for d in detectors.update(_record(125, 1.5, 0.4))] == ["forgetting"]  # ... and back


def test_the_relative_limit_holds_for_text_the_reference_finds_hard():
    detectors = FailureDetectors()
    assert detectors.update(_record(10, 3.0, 0.5)) == []  # 0.5 > 0.3 nats, but 20% of 3.0 nats is 0.6
    assert [d.mode for d in detectors.update(_record(20, 3.0, 0.61))] == ["forgetting"]
    tight = FailureDetectors(forgetting_nll_delta=0.05, forgetting_nll_delta_fraction=0.0)
    assert [d.mode for d in tight.update(_record(10, 3.0, 0.06))] == ["forgetting"]


def test_the_report_draws_the_retention_curves_and_marks_forgetting(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 0, **_record(0, 1.5, 0.0)},
        {"step": 10, "loss": 0.6},
        {"step": 10, "eval_loss": 0.6, **_record(10, 1.5, 0.4)},
        {
            "step": 10,
            "diagnosis": {"mode": "forgetting", "step": 10, "evidence": "e", "mitigation": "m", "severity": "warn"},
        },
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    html = write_report(run).read_text()
    assert "Retention NLL (data.retention_path)" in html and "Retention drift" in html
    assert "warn: forgetting at step 10" in html


def test_config_refuses_bad_retention_and_detector_settings():
    with pytest.raises(ConfigError, match="detectors.forgetting_nll_delta"):
        load_config({"detectors": {"forgetting_nll_delta": -1}})
    with pytest.raises(ConfigError, match="data.retentoin_path|did you mean"):
        load_config({"data": {"retentoin_path": "x.jsonl"}})
