"""A model path that is not a usable model folder gets one line saying what is missing (issue 15.14).

transformers' own messages for these ("Repo id must be in the form 'repo_name'", "install
sentencepiece or tiktoken") name neither the setting nor what dpokit expected there.
"""

from __future__ import annotations

import shutil

import pytest

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.model_source import ModelLoadError
from dpokit.models import load_policy, load_tokenizer
from tiny_assets import synthetic_pairs, tiny_model_dir, write_jsonl


def _cfg(path) -> object:
    return load_config(None, {"model.name_or_path": str(path)})


def test_a_missing_folder_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "runs" / "sft" / "final"
    with pytest.raises(ModelLoadError, match=r"does not exist: dpokit expected a Hugging Face model folder"):
        load_tokenizer(_cfg(missing))
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        load_policy(_cfg(f"./{missing.name}-nowhere"))


def test_an_empty_folder_names_every_missing_part(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"without tokenizer files"):
        load_tokenizer(_cfg(empty))
    with pytest.raises(ModelLoadError, match=r"without config\.json, model weights \(\*\.safetensors\)"):
        load_policy(_cfg(empty))


def test_a_folder_without_weights_is_named_and_a_complete_one_loads(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), folder)
    (folder / "model.safetensors").unlink()
    load_tokenizer(_cfg(folder))  # the tokenizer is there
    with pytest.raises(ModelLoadError, match=r"without model weights"):
        load_policy(_cfg(folder))
    load_policy(_cfg(tiny_model_dir()))


def test_dpokit_train_exits_2_with_the_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8, seed=0))
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        [
            "train",
            "demo",
            f"model.name_or_path={empty}",
            f"data.path={data}",
            "data.eval_path=null",
            f"out_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is a folder without" in err and "Traceback" not in err


def test_lora_runs_print_no_transformers_deprecation_warning(recwarn):
    """peft asks transformers 5 for a deprecated name; the user saw a FutureWarning on every LoRA run (issue 15.18)."""
    cfg = load_config(None, {"model.name_or_path": str(tiny_model_dir()), "lora.enabled": True})
    load_policy(cfg)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning) and "checkpointing" in str(w.message)]
