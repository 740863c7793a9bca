"""`dpokit train` with only data.max_length: 256 set trains on long hh-rlhf transcripts (issue 14, part 6).

max_prompt_length defaults to max_length // 2 = 128. The transcripts are built so the truncation
is known by construction: 6 prompts longer than 128 tokens, 2 chosen and 2 rejected completions
longer than the room their prompt leaves; the summary must say exactly that.
"""

import json
import random

from dpokit.cli import main as cli_main
from dpokit.training.metrics import read_metrics
from tiny_assets import WORDS, tiny_model_dir

CONTENT = [w for w in WORDS if not w.endswith(":")]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(CONTENT) for _ in range(n))


def _transcript(rng: random.Random, prompt_words: int) -> str:
    """A multi-turn "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript of about `prompt_words` words, ending on a Human turn."""
    text, words = "", 0
    while words < prompt_words:
        n = min(30, prompt_words - words)
        text += f"\n\nHuman: {_words(rng, n)}\n\nAssistant: {_words(rng, n)}"
        words += 2 * n + 2
    return text + f"\n\nHuman: {_words(rng, 5)}"


def _row(rng: random.Random, prompt_words: int, chosen_words: int, rejected_words: int) -> dict:
    prompt = _transcript(rng, prompt_words) + "\n\nAssistant:"
    return {
        "chosen": f"{prompt} good {_words(rng, chosen_words - 1)}",
        "rejected": f"{prompt} bad {_words(rng, rejected_words - 1)}",
    }


def test_only_max_length_256_trains_on_long_transcripts_and_counts_truncation(tmp_path, capsys):
    rng = random.Random(0)
    rows = (
        [_row(rng, 300, 10, 12) for _ in range(4)]  # prompt > 128 tokens: cut from the left
        + [_row(rng, 300, 200, 12) for _ in range(2)]  # and a chosen past the 128 tokens left
        + [_row(rng, 20, 100, 300) for _ in range(2)]
    )  # short prompt, a rejected past its room
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert all(max(len(r["chosen"].split()), len(r["rejected"].split())) > 256 for r in rows)  # past max_length
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model:\n  name_or_path: {tiny_model_dir()}\ndata:\n  path: {data}\n  max_length: 256\n"
        f"train:\n  max_steps: 2\nout_dir: {tmp_path / 'run'}\n"
    )

    assert cli_main(["train", str(config)]) == 0

    out = capsys.readouterr().out
    assert "[data]   truncated: 6 prompts (left), 2 chosen, 2 rejected (right)" in out
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())["train"]
    assert summary["truncated"] == {"prompt": 6, "chosen": 2, "rejected": 2}
    assert summary["pairs"] == 8 and summary["rows_skipped"] == 0 and summary["layouts"] == {"implicit_prompt": 8}
    assert summary["token_lengths"]["prompt"]["max"] == 128  # the default prompt limit: max_length // 2
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "max_prompt_length: 128" in resolved
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps and steps[-1]["step"] == 2
