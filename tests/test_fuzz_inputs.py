"""Hostile input never gives a traceback: property tests of the data and config loaders, and the CLI.

Whatever a file holds (arbitrary JSON values, wrong types, odd unicode, raw bytes, empty or huge
rows), `load_preferences` / `load_unpaired` either return examples with every row accounted for
(rows_read == rows_used + rows_skipped) or raise DataError; `load_config` with arbitrary dicts
and overrides returns a Config or raises ConfigError. The CLI turns each into one message naming
the file, row and field, and exit status 2.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.cli import main as cli_main
from dpokit.config import SECTIONS, Config, ConfigError, load_config
from dpokit.data.layouts import load_preferences
from dpokit.data.records import DataError
from dpokit.data.unpaired import load_unpaired
from tiny_assets import tiny_model_dir, word_tokenizer

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COLUMNS = ["prompt", "chosen", "rejected", "conversations", "input", "preferred_output", "non_preferred_output",
           "instruction", "question", "response_j", "response_k", "messages", "completion", "label"]  # fmt: skip

scalars = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
surrogates = st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2
)  # JSON can escape them
texts = (
    st.text(max_size=40)
    | surrogates
    | st.sampled_from(["", " ", "\n", "the film was good", "ünïcødé 日本語 🙂", "\u200b", "a\x00b"])
)
messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "from", "value"]),
        st.sampled_from(["user", "assistant", "system", "human", "gpt", "developer", ""]) | texts | json_values,
        max_size=3,
    ),
    max_size=3,
)
rows = st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=6), texts | json_values | messages, max_size=5)
files = st.lists(rows | json_values, min_size=0, max_size=6)


def _accounted(report) -> None:
    assert report.rows_read == report.rows_used + report.rows_skipped, report.to_dict()
    assert sum(report.layouts.values()) == report.rows_used


def _load_both(path: Path) -> None:
    for load in (load_preferences, load_unpaired):
        try:
            examples, report = load(str(path))
        except DataError as error:
            assert str(path) in str(error)
            continue
        _accounted(report)
        assert len(examples) == report.rows_used


def _write(folder: str, name: str, content) -> Path:
    path = Path(folder) / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(
        content, encoding="utf-8", errors="surrogatepass"
    )
    return path


@FUZZ
@given(values=files)
def test_json_lines_and_json_files_of_arbitrary_values(values):
    with tempfile.TemporaryDirectory() as folder:
        _load_both(_write(folder, "data.jsonl", "".join(json.dumps(v) + "\n" for v in values)))
        _load_both(_write(folder, "data.json", json.dumps(values)))
        _load_both(_write(folder, "wrapped.json", json.dumps({"data": values, "version": 1})))


@FUZZ
@given(
    header=st.lists(st.sampled_from(COLUMNS) | st.text(min_size=1, max_size=6), max_size=4, unique=True),
    cells=st.lists(st.lists(texts, min_size=0, max_size=5), max_size=5),
)
def test_csv_files_of_arbitrary_text(header, cells):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.csv"
        with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(cells)
        _load_both(path)


@FUZZ
@given(
    content=st.binary(max_size=200),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".jsonl.gz", ".parquet", ".txt"]),
)
def test_raw_bytes_in_any_format(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        _load_both(_write(folder, "data" + suffix, content))


HOSTILE = {
    "empty.jsonl": b"",
    "blank_lines.jsonl": b"\n\n  \n",
    "bom_only.json": "\ufeff".encode(),
    "latin1.jsonl": '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"),
    "deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "deep.json": b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "big_number.jsonl": b'{"prompt": ' + b"9" * 5000 + b', "chosen": "a", "rejected": "b"}\n',
    "lone_surrogate.jsonl": b'{"prompt": "\\ud800", "chosen": " good", "rejected": " bad"}\n',
    "not_objects.jsonl": b"1\n",
    "truncated.jsonl.gz": b"\x1f\x8b\x08\x00",
    "header_only.csv": b"prompt,chosen,rejected\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_raise_one_clear_data_error(tmp_path, name):
    path = _write(str(tmp_path), name, HOSTILE[name])
    with pytest.raises(DataError) as error:
        load_preferences(str(path))
    assert str(path) in str(error.value)


def test_a_huge_row_is_read_and_a_bad_row_among_good_ones_is_counted(tmp_path):
    huge = "word " * 1_000_000  # a 5 MB completion
    rows = [
        {"prompt": "p", "chosen": huge, "rejected": "bad"},
        {"prompt": "p", "chosen": 3, "rejected": "x"},
        {"prompt": "p", "chosen": "\ud800", "rejected": "x"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_preferences(str(path))
    assert len(examples) == 1 and len(examples[0].chosen) == len(huge)
    _accounted(report)
    assert report.rows_skipped == 2
    assert any(
        "rows.jsonl:2 (chosen)" in e for e in report.examples["chosen must be a string or a list of messages, got int"]
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(
        st.fixed_dictionaries({"prompt": texts, "chosen": texts, "rejected": texts}), min_size=1, max_size=6
    ),
    max_length=st.integers(2, 12),
    eval_fraction=st.sampled_from([0.0, 0.3]),
)
def test_preparation_counts_every_row_it_drops(tmp_path, values, max_length, eval_fraction):
    from dpokit.data.prepare import prepare_data

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    cfg = load_config(
        None,
        {
            "data.path": str(path),
            "data.max_length": max_length,
            "data.max_prompt_length": 1,
            "data.eval_fraction": eval_fraction,
        },
    )
    try:
        data = prepare_data(cfg, word_tokenizer())
    except DataError:
        return
    s = data.summary["train"]
    assert s["rows_read"] == s["rows_used"] + s["rows_skipped"] + s["held_out"]
    assert s["pairs"] == s["rows_used"] == len(data.train)
    assert data.summary["eval"].get("pairs", 0) == len(data.eval)


# --- config ------------------------------------------------------------------------------------

_DEFAULTS = Config().to_dict()
KEYS = [f"{s}.{k}" for s in SECTIONS for k in _DEFAULTS[s]] + ["out_dir"]
config_values = json_values | st.sampled_from(
    [0, -1, 1, 2**70, 0.5, float("nan"), float("inf"), "", "auto", "never", [], {}, True]
)
sections = st.dictionaries(
    st.sampled_from(sorted({k.split(".")[-1] for k in KEYS})) | st.text(max_size=5), config_values, max_size=4
)
config_dicts = st.dictionaries(
    st.sampled_from(list(SECTIONS) + ["out_dir"]) | st.text(max_size=5) | st.integers(),
    sections | config_values,
    max_size=4,
)


def _load_or_config_error(source, overrides=None):
    try:
        cfg = load_config(source, overrides)
    except ConfigError as error:
        assert str(error)
        return None
    assert isinstance(cfg, Config)
    assert load_config(cfg.to_dict()) == cfg  # a valid config round-trips
    return cfg


@FUZZ
@given(raw=config_dicts)
def test_config_from_arbitrary_dicts(raw):
    _load_or_config_error(raw)


@FUZZ
@given(
    overrides=st.lists(
        st.tuples(
            st.sampled_from(KEYS + ["data.columns.prompt"]) | st.text(max_size=10),
            st.text(max_size=12)
            | st.sampled_from(
                [
                    "1",
                    "-1",
                    "0",
                    "nan",
                    ".inf",
                    "1e999",
                    "[a, b]",
                    "{a: 1}",
                    "true",
                    "null",
                    "2020-01-01",
                    "!!python/name:os.system",
                    "*x",
                ]
            ),
        ),
        max_size=4,
    ).map(lambda kv: [f"{k}={v}" for k, v in kv])
)
def test_config_from_arbitrary_command_line_overrides(overrides):
    _load_or_config_error(None, overrides)


@FUZZ
@given(
    overrides=st.dictionaries(st.sampled_from(KEYS) | st.integers() | st.none(), config_values, max_size=3)
    | st.lists(st.integers() | st.none() | st.text(max_size=5), max_size=3)
)
def test_config_from_arbitrary_python_overrides(overrides):
    _load_or_config_error(None, overrides)


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe train: 1",
        b"- a\n- b\n",
        b"train: [unclosed",
        b"train:\n  batch_size: 0\n",
        b"optim:\n  lr: .nan\n",
        b"train: {resume: ''}",
        b"&a [*a]",
        b"x" * 10,
    ],
)
def test_config_files_that_are_not_configs(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError):
        load_config(path)
    with pytest.raises(ConfigError):
        load_config(tmp_path)  # a folder


# --- the CLI: one message naming file, row and field; exit 2 -----------------------------------


def _cli_case(tmp_path: Path, case: str) -> tuple[list[str], list[str]]:
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "the film", "chosen": " good", "rejected": " bad"}\n')
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir())},
        "data": {"path": str(data), "max_length": 32, "max_prompt_length": 16},
        "train": {"max_steps": 1, "progress_bar": False},
        "out_dir": str(tmp_path / "run"),
    }
    overrides: list[str] = []
    expect = [str(data)]
    if case == "missing data":
        data.unlink()
        expect += ["file not found"]
    elif case == "not utf-8":
        data.write_bytes(b'{"prompt": "caf\xe9"}\n')
        expect += ["not valid UTF-8", "line 1"]
    elif case == "wrong types in every row":
        data.write_text('{"prompt": 1, "chosen": [1], "rejected": null}\n')
        expect += ["prompt must be a string", "data.jsonl:1 (prompt)"]
    elif case == "bad json on row 2":
        data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
        expect += ["row 2", "not valid JSON"]
    elif case == "missing model":
        cfg["model"]["name_or_path"] = str(tmp_path / "no-model")
        expect = ["model.name_or_path", "no-model"]
    elif case == "bad config value":
        overrides = ["train.batch_size=-3"]
        expect = ["train.batch_size", "-3"]
    elif case == "unset data path":
        cfg["data"]["path"] = ""
        expect = ["data.path is not set"]
    elif case == "out_dir is a file":
        (tmp_path / "taken").write_text("")
        cfg["out_dir"] = str(tmp_path / "taken" / "run")
        expect = ["out_dir", "taken"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["train", str(path), *overrides], expect


@pytest.mark.parametrize(
    "case",
    [
        "missing data",
        "not utf-8",
        "wrong types in every row",
        "bad json on row 2",
        "missing model",
        "bad config value",
        "unset data path",
        "out_dir is a file",
    ],
)
def test_cli_user_errors_exit_2_with_one_message(tmp_path, capsys, case):
    argv, expect = _cli_case(tmp_path, case)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("dpokit: error: ")]
    assert len(messages) == 1 and "Traceback" not in err, err
    for text in expect:
        assert text in messages[0], (text, messages[0])


def test_a_conversation_the_chat_template_refuses_is_skipped_and_counted(tmp_path):
    from dpokit.data.prepare import prepare_data
    from dpokit.tiny import CHATML_TEMPLATE

    tokenizer = word_tokenizer()
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% endfor %}"
    )
    tokenizer = tokenizer.__class__.from_pretrained(str(tiny_model_dir()))
    tokenizer.chat_template = strict + CHATML_TEMPLATE
    good = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    bad = {**good, "prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)))
    data = prepare_data(
        load_config(None, {"data.path": str(path), "data.max_length": 32, "data.max_prompt_length": 16}), tokenizer
    )
    s = data.summary["train"]
    assert len(data.train) == 2 and s["rows_read"] == 3 and s["rows_skipped"] == 1
    assert any(
        "chat.jsonl:2" in e and "must alternate" in e
        for e in s["skipped_examples"]["the chat template cannot render the conversation"]
    )
