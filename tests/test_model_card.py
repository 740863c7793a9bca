"""final/README.md, the model card, and train.push_to_hub: what the card says is what the run did, and an
unreachable Hub costs one line, never the saved model."""

import datetime
import importlib
import json
import os
import shutil

import huggingface_hub
import pytest
import yaml
from huggingface_hub import errors as hub_errors
from transformers import AutoModelForCausalLM

import dpokit
from dpokit.cli import main as cli_main
from dpokit.config import Config, ConfigError, load_config
from dpokit.config.validate import validate
from dpokit.training.export import push_to_hub
from dpokit.training.metrics import read_metrics
from dpokit.training.model_card import RunFacts, hub_id, render_card
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl


def _config(tmp_path, model_dir, **train):
    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(48, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(16, seed=2))
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(train_file), "eval_path": str(eval_file), "max_length": 32, "max_prompt_length": 16},
        "loss": {"beta": 0.25, "label_smoothing": 0.1},
        "optim": {"lr": 3e-3},
        "train": {"batch_size": 8, "grad_accum": 2, "max_steps": 4, "logging_steps": 2, "progress_bar": False, **train},
        "out_dir": str(tmp_path / "run"),
    }


def _card(model_dir):
    text = (model_dir / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def _table(body: str) -> dict:
    """The `| name | value |` rows of the card's tables."""
    rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("| ") and line.count("|") == 3]
    return {k.strip(): v.strip() for k, v in rows}


def _as_hub_cache_snapshot(tmp_path, repo: str, license_: str):
    """The tiny model where huggingface_hub's cache would keep a download of `repo`, with the base's own card."""
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir(), folder)
    (folder / "README.md").write_text(f"---\nlicense: {license_}\n---\n# tiny\n")
    return folder


def _assert_metrics_match_the_log(card_rows: dict, run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    last_train = next(r for r in reversed(records) if "loss" in r)
    last_eval = next(r for r in reversed(records) if "eval_loss" in r)
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert float(card_rows[name]) == pytest.approx(last_train[name], rel=1e-5)
    for name in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert float(card_rows[name]) == pytest.approx(last_eval[name], rel=1e-5)


@pytest.mark.slow
def test_full_fine_tuning_card_holds_the_base_the_data_the_settings_and_the_last_metrics(tmp_path):
    base = _as_hub_cache_snapshot(tmp_path, "dpokit-tests/tiny-llama", "apache-2.0")
    result = dpokit.train(_config(tmp_path, base))

    front, body = _card(result.model_dir)
    assert front["base_model"] == "dpokit-tests/tiny-llama" and front["license"] == "apache-2.0"
    assert front["library_name"] == "transformers" and {"dpokit", "trl", "dpo"} <= set(front["tags"])
    assert "datasets" not in front  # local files are no Hub datasets
    rows = _table(body)
    summary = json.loads((result.run_dir / "data_summary.json").read_text())
    assert f"| train | 48 | 48 | 0 | 0 | {summary['train']['pairs']} |" in body
    assert f"| eval | 16 | 16 | 0 | 0 | {summary['eval']['pairs']} |" in body
    assert "| loss | sigmoid |" in body and rows["beta"] == "0.25" and rows["loss.label_smoothing"] == "0.1"
    assert rows["method"] == "full fine-tuning" and rows["batch"].startswith("8 x 2 accumulation x 1 processes = 16")
    assert rows["optimizer steps"] == "4 (train.max_steps=4)" and rows["max length"].startswith("32 tokens")
    _assert_metrics_match_the_log(rows, result.run_dir)
    assert "None of dpokit's failure detectors fired." in body and f"dpokit {dpokit.__version__}" in body
    # the snippet loads the model it names
    assert f"AutoModelForCausalLM.from_pretrained({os.path.abspath(result.model_dir)!r})" in body
    assert AutoModelForCausalLM.from_pretrained(result.model_dir) is not None

    # deterministic but for the date: the same facts render the same card
    cfg = load_config(str(result.run_dir / "config.yaml"))
    facts = RunFacts(summary, result.metrics, [], 1, 4)
    day = datetime.date(2026, 1, 2)
    assert render_card(cfg, facts, result.model_dir, day) == render_card(cfg, facts, result.model_dir, day)


@pytest.mark.slow
def test_lora_adapter_card_loads_through_peft_and_names_the_adapter_settings(tmp_path):
    cfg = _config(tmp_path, tiny_model_dir())
    cfg["lora"] = {"enabled": True, "r": 4, "alpha": 8}
    result = dpokit.train(cfg)

    front, body = _card(result.model_dir)
    assert "base_model" not in front  # a plain local folder has no Hub id; the Hub refuses a path there
    assert f"`{tiny_model_dir()}`" in body  # the body names it instead
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    rows = _table(body)
    assert rows["method"].startswith("LoRA r=4, alpha=8") and rows["method"].endswith("saved as adapter")
    _assert_metrics_match_the_log(rows, result.run_dir)
    assert f"AutoPeftModelForCausalLM.from_pretrained({os.path.abspath(result.model_dir)!r})" in body
    assert "AutoModelForCausalLM.from_pretrained" not in body and "PeftModel.from_pretrained" in body
    assert "Model Card for Model ID" not in body  # PEFT's template README, written by save_pretrained, is replaced


def _offline_error() -> Exception:
    """What huggingface_hub's HTTP client raises when nothing answers (a closed local port: no network needed)."""
    try:
        huggingface_hub.utils.get_session().get("http://127.0.0.1:9", timeout=5)
    except Exception as e:  # noqa: BLE001 - whichever client this huggingface_hub uses
        return e
    pytest.skip("something answers on 127.0.0.1:9")


@pytest.mark.slow
def test_push_to_hub_offline_is_one_line_and_the_model_stays_saved(tmp_path, monkeypatch, capsys):
    error = _offline_error()

    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "create_repo", unreachable)
    monkeypatch.setattr(huggingface_hub, "upload_folder", unreachable)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, tiny_model_dir(), push_to_hub="someone/tiny-dpo")))

    assert cli_main(["train", str(cfg_path)]) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "train.push_to_hub" in line]
    final = tmp_path / "run" / "final"
    assert len(lines) == 1 and "Traceback" not in captured.out + captured.err
    assert f"saved locally at {final}" in lines[0] and f"hf upload someone/tiny-dpo {final}" in lines[0]
    assert type(error).__name__ in lines[0]
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()


def _http_response(status: int):
    http = importlib.import_module(type(huggingface_hub.utils.get_session()).__module__.split(".")[0])
    return http.Response(status, request=http.Request("POST", "https://huggingface.co/api/repos/create"))


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: hub_errors.OfflineModeIsEnabled(
            "Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled."
        ),
        lambda: hub_errors.HfHubHTTPError(
            "401 Client Error: Unauthorized for url\nInvalid credentials", response=_http_response(401)
        ),
        lambda: hub_errors.LocalTokenNotFoundError("Token is required (`token=True`), but no token found."),
    ],
    ids=["HF_HUB_OFFLINE", "unauthorised", "no-token"],
)
def test_push_to_hub_turns_each_hub_failure_into_one_line(tmp_path, monkeypatch, make_error):
    error = make_error()

    def refused(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "create_repo", refused)
    line = push_to_hub(tmp_path, "someone/tiny-dpo", private=True)
    assert "\n" not in line and type(error).__name__ in line
    assert f"saved locally at {tmp_path}" in line and f"hf upload someone/tiny-dpo {tmp_path} --private" in line


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(
        huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"]))
    )
    line = push_to_hub(tmp_path, "someone/tiny-dpo", private=False)
    assert calls == [
        ("create", "someone/tiny-dpo", {"private": False, "exist_ok": True}),
        ("upload", "someone/tiny-dpo", str(tmp_path)),
    ]
    assert line == f"[dpokit] pushed {tmp_path} to https://huggingface.co/someone/tiny-dpo"


def test_hub_ids_are_told_from_local_paths(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    assert hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B" and hub_id("gpt2") == "gpt2"
    assert hub_id(str(snapshot)) == "org/name"
    assert (
        hub_id(str(tmp_path / "plain")) is None and hub_id("data/pairs.jsonl") is None and hub_id("demo:pairs") is None
    )


def test_push_to_hub_takes_a_repo_id_only():
    cfg = Config()
    cfg.train.push_to_hub = "someone/tiny-dpo"
    validate(cfg)
    cfg.train.push_to_hub = "not a repo/id"
    with pytest.raises(ConfigError, match="train.push_to_hub"):
        validate(cfg)
