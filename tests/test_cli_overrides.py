"""key=value overrides are read wherever they stand on the command line, after options too."""

from __future__ import annotations

import pytest

from dpokit.cli import build_parser, main
from tiny_assets import tiny_model_dir


def test_an_override_after_an_option_is_applied(capsys):
    args, extra = build_parser().parse_known_args(["doctor", "d.jsonl", "--sample", "0", "data.max_length=256"])
    assert extra == [
        "data.max_length=256"
    ]  # argparse alone leaves it over (it used to stop with "unrecognized arguments")
    model = f"model.name_or_path={tiny_model_dir()}"
    main(["plan", "demo", model, "--gpus", "1", "train.batch_size=3", "data.max_length=77"])
    assert f"{3 * 2 * 77} tokens" in capsys.readouterr().out  # plan's activations line: batch x 2 rows x max_length


def test_an_unknown_option_still_stops():
    with pytest.raises(SystemExit):
        main(["config", "demo", "--no-such-option"])
