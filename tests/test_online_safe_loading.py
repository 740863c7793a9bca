"""Every verb that loads a model refuses what `dpokit train` refuses, and names the setting that opts in.

A local model folder with pickle-only weights (pytorch_model.bin), or with an `auto_map` in
config.json (custom code shipped with the model), is refused by train, sample, eval, score (a
reward model) and pipeline with exit status 2 and a message naming that verb's opt-in; with the
opt-in the model loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.config import load_pipeline_config
from dpokit.model_source import ModelLoadError
from dpokit.online.pipeline import Pipeline
from tiny_assets import synthetic_pairs, tiny_model_dir, word_tokenizer, write_jsonl

# The custom code is harmless, but records that it ran: refused, it must never run.
CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import AutoModel, LlamaModel, {config_class}, {model_class}
class CustomConfig({config_class}):
    model_type = "custom_llama"
class CustomModel({model_class}):
    config_class = CustomConfig
class CustomBase(LlamaModel):  # what a sequence-classification head builds its body from (AutoModel.from_config)
    config_class = CustomConfig
AutoModel.register(CustomConfig, CustomBase, exist_ok=True)
"""


def _pickle_only(folder: Path) -> Path:
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _custom_code(folder: Path, auto_class: str, model_class: str) -> Path:
    marker = folder.parent / f"{folder.name}-code-ran.txt"
    (folder / "custom.py").write_text(
        CUSTOM_CODE.format(marker=str(marker), config_class="LlamaConfig", model_class=model_class)
    )
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom_llama", auto_map={"AutoConfig": "custom.CustomConfig", auto_class: "custom.CustomModel"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _policy(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / f"policy-{kind}"
    shutil.copytree(tiny_model_dir(), folder)
    return (
        _pickle_only(folder) if kind == "pickle" else _custom_code(folder, "AutoModelForCausalLM", "LlamaForCausalLM")
    )


def _reward_model(tmp_path: Path, kind: str) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(0)
    folder = tmp_path / f"rm-{kind}"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    if kind == "pickle":
        return _pickle_only(folder)
    return _custom_code(folder, "AutoModelForSequenceClassification", "LlamaForSequenceClassification")


def _files(tmp_path: Path) -> dict:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("the film was", "it is", "the plot", "a movie")]
    )
    samples = write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {
                "prompt": "the film was",
                "prompt_index": 0,
                "sample_index": j,
                "completion": c,
                "prompt_tokens": 3,
                "completion_tokens": 2,
                "finished": True,
            }
            for j, c in enumerate((" good", " bad"))
        ],
    )
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def text_hash(completion):\n    return float(sum(map(ord, completion)) % 97)\n")
    return {"prompts": prompts, "samples": samples, "rewards": rewards}


def _train_yaml(tmp_path: Path, model: Path) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(16, seed=1))
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "train": {"batch_size": 8, "max_steps": 1, "progress_bar": False},
        "out_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pipeline_yaml(tmp_path: Path, policy: Path, scorer: str, model: dict | None = None, **keys) -> Path:
    """A 1-round pipeline; `model`: its train section's model keys (the one trust switch)."""
    train = {
        "data": {"max_length": 32, "max_prompt_length": 16},
        "train": {"batch_size": 4, "max_steps": 1, "progress_bar": False},
    }
    cfg = {
        "policy": str(policy),
        "prompts": ["the film was", "it is", "the plot was", "a movie is"],
        "rounds": 1,
        "scorer": scorer,
        "sampling": {"num_samples": 4, "max_new_tokens": 4, "backend": "hf"},
        "train": {**train, "model": model} if model else train,
        "out_dir": str(tmp_path / "pipeline"),
        **keys,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(verb: str, tmp_path: Path, kind: str) -> list[str]:
    f = _files(tmp_path)
    if verb == "train":
        return ["train", str(_train_yaml(tmp_path, _policy(tmp_path, kind)))]
    if verb == "sample":
        return [
            "sample",
            "--model",
            str(_policy(tmp_path, kind)),
            "--prompts",
            str(f["prompts"]),
            "--out",
            str(tmp_path / "s.jsonl"),
            "-n",
            "2",
            "--max-new-tokens",
            "3",
            "--backend",
            "hf",
        ]
    if verb == "eval":
        return [
            "eval",
            "--policy",
            str(_policy(tmp_path, kind)),
            "--prompts",
            str(f["prompts"]),
            "-n",
            "2",
            "--max-new-tokens",
            "3",
        ]
    if verb == "score":
        return [
            "score",
            "--in",
            str(f["samples"]),
            "--out",
            str(tmp_path / "scored.jsonl"),
            "--scorer",
            f"rm:{_reward_model(tmp_path, kind)}",
        ]
    assert verb == "pipeline"
    return ["pipeline", str(_pipeline_yaml(tmp_path, _policy(tmp_path, kind), f"{f['rewards']}:text_hash"))]


# What each verb's refusal names: the one trust switch (model.* keys; the online verbs' flags are its aliases; in a
# pipeline, its train section's).
SETTING = {
    "train": {"pickle": "model.allow_pickle=true", "code": "model.trust_remote_code=true"},
    "sample": {
        "pickle": "model.allow_pickle=true (--allow-pickle)",
        "code": "model.trust_remote_code=true (--trust-remote-code)",
    },
    "eval": {
        "pickle": "model.allow_pickle=true (--allow-pickle)",
        "code": "model.trust_remote_code=true (--trust-remote-code)",
    },
    "score": {
        "pickle": "model.allow_pickle=true (--allow-pickle)",
        "code": "model.trust_remote_code=true (--trust-remote-code)",
    },
    "pipeline": {"pickle": "train.model.allow_pickle=true", "code": "train.model.trust_remote_code=true"},
}


@pytest.mark.parametrize("kind", ["pickle", "code"])
@pytest.mark.parametrize("verb", ["train", "sample", "eval", "score", "pipeline"])
def test_every_verb_refuses_pickle_weights_and_model_code(verb, kind, tmp_path, capsys):
    command = _command(verb, tmp_path, kind)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert SETTING[verb][kind] in err, err
    assert ("only pickle-based weights" if kind == "pickle" else "ships its own Python code") in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*-code-ran.txt")), "the model's own code ran"


def test_sample_and_score_accept_pickle_weights_when_allowed(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "r").mkdir()
    assert main(_command("sample", tmp_path / "s", "pickle") + ["--allow-pickle"]) == 0
    assert "prompts generated" in capsys.readouterr().out
    assert main(_command("score", tmp_path / "r", "pickle") + ["--allow-pickle"]) == 0
    assert "2 rows scored" in capsys.readouterr().out


@pytest.mark.parametrize("switch", ["--trust-remote-code", "model.trust_remote_code=true"])
def test_eval_runs_model_code_only_when_trusted(switch, tmp_path, capsys):
    command = _command("eval", tmp_path, "code")
    assert main(command + [switch]) == 0  # the flag is an alias of the one key
    assert "mean length" in capsys.readouterr().out
    assert list(tmp_path.glob("*-code-ran.txt")), "trusted: the model's code was what loaded it"


def test_score_takes_the_pickle_opt_in_from_its_config_file(tmp_path, capsys):
    config = tmp_path / "score.yaml"
    config.write_text("model:\n  allow_pickle: true\n")
    assert main(_command("score", tmp_path, "pickle") + [str(config)]) == 0
    assert "2 rows scored" in capsys.readouterr().out


# A pipeline's one trust switch is its train section's model.trust_remote_code / model.allow_pickle: on, it covers the
# policy (sampled and evaluated), a reward model and training; off, each refuses (the policy: the test above).
SWITCH = {"pickle": "allow_pickle", "code": "trust_remote_code"}


@pytest.mark.parametrize("kind", ["pickle", "code"])
def test_a_pipeline_refuses_a_reward_model_without_the_switch(kind, tmp_path, capsys):
    config = _pipeline_yaml(tmp_path, tiny_model_dir(), f"rm:{_reward_model(tmp_path, kind)}")
    assert main(["pipeline", str(config)]) == 2
    err = capsys.readouterr().err
    assert SETTING["pipeline"][kind] in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("*-code-ran.txt")), "the reward model's own code ran"


@pytest.mark.parametrize("kind", ["pickle", "code"])
def test_a_pipeline_trains_only_with_the_switch(kind, tmp_path):
    """Training in a pipeline reads the same switch: off, round 1's DPO refuses the policy it starts from."""
    f = _files(tmp_path)
    pipeline = Pipeline(
        load_pipeline_config(_pipeline_yaml(tmp_path, _policy(tmp_path, kind), f"{f['rewards']}:text_hash"))
    )
    pipeline.round_dir(1).mkdir(parents=True)
    write_jsonl(pipeline.round_dir(1) / "pairs.jsonl", synthetic_pairs(16, seed=1))
    with pytest.raises(
        ModelLoadError, match="only pickle-based weights" if kind == "pickle" else "ships its own Python code"
    ):
        pipeline.dpo_round(1)
    assert not list(tmp_path.glob("*-code-ran.txt")), "the model's own code ran"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pickle", "code"])
def test_the_switch_covers_every_model_a_pipeline_loads(kind, tmp_path, capsys):
    policy, reward_model = _policy(tmp_path, kind), _reward_model(tmp_path, kind)
    config = _pipeline_yaml(
        tmp_path, policy, f"rm:{reward_model}", model={SWITCH[kind]: True}, eval_prompts=["the film was"]
    )
    assert main(["pipeline", str(config)]) == 0, capsys.readouterr().err
    round1 = tmp_path / "pipeline" / "round_1"
    assert json.loads((round1 / "round.json").read_text())["scoring"]["scored"] == 16  # the reward model scored
    assert yaml.safe_load((round1 / "dpo" / "config.yaml").read_text())["model"][SWITCH[kind]] is True
    assert (round1 / "dpo" / "final" / "config.json").exists() and (round1 / "eval.json").exists()
    if kind == "code":  # the policy's and the reward model's own code loaded them
        assert sorted(p.name for p in tmp_path.glob("*-code-ran.txt")) == [
            "policy-code-code-ran.txt",
            "rm-code-code-ran.txt",
        ]


@pytest.mark.slow
def test_the_deprecated_pipeline_key_still_switches_trust_on(tmp_path, capsys):
    """The top-level allow_pickle / trust_remote_code of before: accepted for one release, with a warning naming the key."""
    f = _files(tmp_path)
    config = _pipeline_yaml(tmp_path, _policy(tmp_path, "pickle"), f"{f['rewards']}:text_hash")
    with pytest.warns(
        FutureWarning,
        match=r"config key 'allow_pickle' of a pipeline is deprecated.*set train.model.allow_pickle: true",
    ):
        assert (
            main(["pipeline", str(config), "allow_pickle=true"]) == 0
        )  # sampling, and training (model.allow_pickle passed on)
    round1 = yaml.safe_load((tmp_path / "pipeline" / "round_1" / "dpo" / "config.yaml").read_text())
    assert round1["model"]["allow_pickle"] is True
    assert (tmp_path / "pipeline" / "round_1" / "dpo" / "final" / "config.json").exists()
