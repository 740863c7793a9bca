"""JSON files dpokit reads back or checks before loading go through the input gateway (`inputs.read_json`): a model
folder's config.json / tokenizer_config.json (model_source) and a resumed pipeline's round files. Each is tried
with a device, a FIFO and a path outside: never read until memory runs out, never a hang."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dpokit.config import load_config, load_pipeline_config
from dpokit.inputs import InputError, read_json
from dpokit.model_source import ModelLoadError, check_model_source
from dpokit.online.pipeline import Pipeline
from tiny_assets import tiny_model_dir


def _hostile(path: Path, kind: str, outside: Path) -> None:
    """Put a device, a FIFO or a link to a file outside in place of `path`."""
    path.unlink(missing_ok=True)
    if kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(outside)


def test_read_json_refuses_what_is_not_a_regular_file_and_a_link_out_of_its_folder(tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"a": 1}')
    own = tmp_path / "own"
    own.mkdir()
    (own / "ok.json").write_text('{"b": 2}')
    assert read_json(own / "ok.json", "run", within=own) == {"b": 2}
    _hostile(own / "x.json", "device", outside)
    with pytest.raises(InputError, match="not a regular file but a device"):
        read_json(own / "x.json", "run")
    with pytest.raises(InputError, match="leads outside"):  # /dev/zero is outside the folder too
        read_json(own / "x.json", "run", within=own)
    _hostile(own / "x.json", "fifo", outside)
    with pytest.raises(InputError, match="not a regular file but a pipe"):
        read_json(own / "x.json", "run", within=own)
    _hostile(own / "x.json", "outside", outside)
    with pytest.raises(InputError, match="leads outside"):
        read_json(own / "x.json", "run", within=own)
    assert read_json(own / "x.json", "run") == {"a": 1}  # without `within`, a link is followed like any input


@pytest.mark.parametrize("kind", ["device", "fifo", "outside"])
def test_a_resumed_pipeline_reads_its_round_files_only_as_its_own_regular_files(tmp_path, kind):
    outside = tmp_path / "planted.json"
    outside.write_text(json.dumps({"round": 0, "policy": "not/the-sft-model"}))
    out = tmp_path / "pipe"
    cfg = {"policy": "some/model", "prompts": ["a", "b"], "scorer": "dpokit.demo.world:sentiment", "out_dir": str(out)}
    pipeline = Pipeline(load_pipeline_config(cfg))
    for path, stage in (
        (out / "round_0" / "round.json", pipeline.run_round_zero),
        (out / "round_1" / "eval.json", lambda: pipeline.eval_round(1)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        _hostile(path, kind, outside)
        with pytest.raises(InputError) as refused:
            stage()
        assert str(path) in str(refused.value)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_model_folder_whose_config_is_not_a_regular_file_is_refused_before_loading(tmp_path, kind):
    folder = Path(shutil.copytree(tiny_model_dir(), tmp_path / "model"))
    _hostile(folder / "tokenizer_config.json", kind, tmp_path / "unused.json")
    cfg = load_config({"model": {"name_or_path": str(folder)}, "data": {"path": "x.jsonl"}})
    with pytest.raises(ModelLoadError, match="tokenizer_config.json: not a regular file"):
        check_model_source(cfg, needs=("model", "tokenizer"))


def test_a_config_linked_from_outside_the_model_folder_is_read_through_the_link(tmp_path):
    """A hub cache's snapshot files are links to its blobs, so the link is followed (not confined): the remote-code
    check reads what transformers would load, and refuses the auto_map found there."""
    folder = Path(shutil.copytree(tiny_model_dir(), tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    blob = tmp_path / "blobs" / "config"
    blob.parent.mkdir()
    blob.write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(blob)
    cfg = load_config({"model": {"name_or_path": str(folder)}, "data": {"path": "x.jsonl"}})
    with pytest.raises(ModelLoadError, match="config.json has an auto_map"):
        check_model_source(cfg, needs=("model", "tokenizer"))
