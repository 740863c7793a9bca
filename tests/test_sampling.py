"""`dpokit sample`: N completions per prompt to JSONL, resumable without regenerating finished prompts."""

from __future__ import annotations

import json

import pytest

from dpokit.data.records import DataError
from dpokit.config import SamplingConfig
from dpokit.online.backends import HFBackend
from dpokit.online.prompts import describe_counts, load_prompts
from dpokit.online.sampling import complete_groups, read_samples, sample_to_file
from dpokit.tiny import build_tiny_llama
from tiny_assets import word_tokenizer, write_jsonl


PROMPTS = ["the film was", "the movie was", "it is", "the plot was", "the acting was", "a movie is", "the film is"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = word_tokenizer()
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0), tokenizer


class CountingBackend(HFBackend):
    """The HF backend, counting generate calls and the prompts sent; optionally crashing on call `crash_at`."""

    def __init__(self, model, tokenizer, crash_at=None):
        super().__init__(model, tokenizer)
        self.calls, self.prompts, self.crash_at = 0, [], crash_at

    def generate(self, texts, cfg, seed):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt  # the job is killed in the middle of a generate call
        self.prompts += texts
        return super().generate(texts, cfg, seed)


CFG = SamplingConfig(num_samples=3, temperature=1.0, max_new_tokens=5, seed=1, batch_size=6)  # 2 prompts per call


def test_rows_and_token_counts(tiny, tmp_path):
    model, tokenizer = tiny
    report = sample_to_file(PROMPTS[:3], tmp_path / "s.jsonl", CFG, HFBackend(model, tokenizer), model_id="tiny")
    rows = read_samples(tmp_path / "s.jsonl")
    assert report.rows == len(rows) == 9 and report.generate_calls == 2 and report.generated == 3
    assert [(r["prompt"], r["prompt_index"], r["sample_index"]) for r in rows] == [
        (p, i, j) for i, p in enumerate(PROMPTS[:3]) for j in range(3)
    ]
    for r in rows:
        assert r["prompt_tokens"] == len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        assert 1 <= r["completion_tokens"] <= 5
        assert r["finished"] or r["completion_tokens"] == 5  # unfinished = cut off at max_new_tokens
    settings = json.loads((tmp_path / "s.jsonl.settings.json").read_text())
    assert settings["num_samples"] == 3 and settings["model"] == "tiny" and settings["prompts_per_chunk"] == 2


def test_resume_does_not_regenerate_finished_prompts(tiny, tmp_path):
    model, tokenizer = tiny
    uninterrupted = tmp_path / "full.jsonl"
    sample_to_file(PROMPTS, uninterrupted, CFG, HFBackend(model, tokenizer))

    out = tmp_path / "resumed.jsonl"
    crashing = CountingBackend(model, tokenizer, crash_at=3)  # chunks 1 and 2 (4 prompts) finish, chunk 3 dies
    with pytest.raises(KeyboardInterrupt):
        sample_to_file(PROMPTS, out, CFG, crashing)
    assert len(read_samples(out)) == 4 * 3
    again = CountingBackend(model, tokenizer)
    report = sample_to_file(PROMPTS, out, CFG, again)
    assert report.already_done == 4 and report.generated == 3
    assert again.calls == 2 and again.prompts == PROMPTS[4:]  # only the unfinished prompts were generated
    # the resumed file is the uninterrupted one: each chunk has its own seed
    assert out.read_text() == uninterrupted.read_text()
    done = CountingBackend(model, tokenizer)
    assert sample_to_file(PROMPTS, out, CFG, done).generated == 0 and done.calls == 0


def test_torn_and_partial_writes_are_repaired(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "s.jsonl"
    sample_to_file(PROMPTS[:4], out, CFG, HFBackend(model, tokenizer))
    rows = read_samples(out)
    # a crash left prompt 3 with one of its three rows and half a JSON line
    text = "".join(json.dumps(r) + "\n" for r in rows[:-2]) + '{"prompt": "the plot was", "sampl'
    out.write_text(text)
    assert set(complete_groups(read_samples(out), 3)) == set(PROMPTS[:3])
    backend = CountingBackend(model, tokenizer)
    report = sample_to_file(PROMPTS[:4], out, CFG, backend)
    assert backend.prompts == ["the plot was"] and report.already_done == 3
    fixed = read_samples(out)
    assert len(fixed) == 12 and sorted((r["prompt_index"], r["sample_index"]) for r in fixed) == [
        (i, j) for i in range(4) for j in range(3)
    ]


def test_other_settings_are_refused(tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "s.jsonl"
    sample_to_file(PROMPTS[:2], out, CFG, HFBackend(model, tokenizer))
    other = SamplingConfig(num_samples=3, temperature=0.7, max_new_tokens=5, seed=1, batch_size=6)
    with pytest.raises(DataError, match="temperature: 1.0 -> 0.7"):
        sample_to_file(PROMPTS[:2], out, other, HFBackend(model, tokenizer))


def test_duplicates_are_sampled_once_and_chat_prompts_use_the_template(tiny, tmp_path):
    model, tokenizer = tiny
    chat = [{"role": "user", "content": "hi how are you"}]
    backend = CountingBackend(model, tokenizer)
    report = sample_to_file(
        ["it is", chat, "it is"],
        tmp_path / "s.jsonl",
        SamplingConfig(num_samples=2, max_new_tokens=3, batch_size=8),
        backend,
    )
    assert report.prompts == 2 and backend.calls == 1
    assert backend.prompts == ["it is", "<|im_start|>user\nhi how are you<|im_end|>\n<|im_start|>assistant\n"]
    rows = read_samples(tmp_path / "s.jsonl")
    assert rows[2]["prompt"] == chat and rows[2]["prompt_tokens"] == len(
        tokenizer(backend.prompts[1], add_special_tokens=False)["input_ids"]
    )


def test_rows_with_tools_are_skipped_and_counted_not_sampled_without_their_tools(tmp_path):
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
    ]
    openai = {
        "input": {"messages": [{"role": "user", "content": "rain?"}], "tools": tools},
        "preferred_output": [{"role": "assistant", "content": "yes"}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    }
    rows = [{"prompt": [{"role": "user", "content": "weather?"}], "tools": tools}, {"prompt": "the film was"}, openai]
    prompts, counts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert prompts == ["the film was"] and counts["rows_with_tools"] == 2
    assert "2 rows with tools skipped" in describe_counts(counts)
    with pytest.raises(DataError, match="online verbs .* do not pass tools"):
        load_prompts(str(write_jsonl(tmp_path / "t.jsonl", rows[:1])))
    # As dpokit train reads the column: JSON text "[]" (a CSV or parquet export) offers no tools; unreadable text is skipped.
    text_rows = [{"prompt": "no tools here", "tools": "[]"}, {"prompt": "broken", "tools": "{not json"}]
    prompts, counts = load_prompts(str(write_jsonl(tmp_path / "x.jsonl", text_rows)))
    assert prompts == ["no tools here"] and counts["rows_with_tools"] == 1


def test_load_prompts_from_layouts(tmp_path):
    rows = [
        {"prompt": "the film was"},
        {"prompt": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "no"}]},
        {"prompt": "it is", "chosen": " good", "rejected": " bad"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
        {"prompt": "the film was"},
        {"text": "nothing here"},
    ]
    prompts, counts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert prompts == [
        "the film was",
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "tell me"}],
        "it is",
        "\n\nHuman: hi\n\nAssistant:",
    ]
    assert counts == {"rows_read": 7, "prompts": 5, "duplicates": 1, "rows_without_prompt": 1, "rows_with_tools": 0}
    assert load_prompts(str(tmp_path / "p.jsonl"), max_prompts=2)[0] == prompts[:2]
    with pytest.raises(DataError, match="no prompts found"):
        load_prompts(str(write_jsonl(tmp_path / "none.jsonl", [{"text": "x"}])))


def test_bad_settings():
    for bad in (dict(num_samples=0), dict(top_p=0), dict(temperature=-1), dict(backend="tgi")):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def _has_verb(name: str) -> bool:
    from dpokit.cli import build_parser

    parser = build_parser()
    return any(name in (getattr(action, "choices", None) or {}) for action in parser._actions)


@pytest.mark.skipif(
    not _has_verb("sample"), reason="needs the cli.py change that adds the sample/score/pair verbs (docs/pipeline.md)"
)
def test_cli_sample_score_pair(tmp_path, capsys):
    from dpokit.cli import main
    from tiny_assets import tiny_model_dir

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    samples, scored, pairs = tmp_path / "samples.jsonl", tmp_path / "scored.jsonl", tmp_path / "pairs.jsonl"
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(completion):\n    return len(completion.split())\n")
    assert (
        main(
            [
                "sample",
                "--model",
                str(tiny_model_dir()),
                "--prompts",
                str(prompts),
                "--out",
                str(samples),
                "-n",
                "3",
                "--max-new-tokens",
                "6",
                "--backend",
                "hf",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "sample",
                "--model",
                str(tiny_model_dir()),
                "--prompts",
                str(prompts),
                "--out",
                str(samples),
                "-n",
                "3",
                "--max-new-tokens",
                "6",
                "--backend",
                "hf",
            ]
        )
        == 0
    )  # resumed: nothing left to do
    assert "0 prompts generated, 4 already done" in capsys.readouterr().out
    assert main(["score", "--in", str(samples), "--out", str(scored), "--scorer", f"{rewards}:length"]) == 0
    assert main(["pair", "--in", str(scored), "--out", str(pairs)]) == 0
    assert "pairs from" in capsys.readouterr().out
    assert len(read_samples(samples)) == 12 and all("score" in r for r in read_samples(scored))
    assert main(["score", "--in", str(samples), "--out", str(scored)]) == 2  # neither --scorer nor --judge-url
    assert "exactly one of --scorer and --judge-url" in capsys.readouterr().err
