"""The input gateway (docs/robustness.md): every input of every verb against hostile files, and the cases
a hostile trial found (issue 20): each of those failed before the gateway (a traceback, a hang, or a read
until memory ran out) and is refused in one line, or counted as a skipped row, now."""

from __future__ import annotations

import gzip
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.data.layouts import load_preference_groups, load_preferences
from dpokit.data.records import DataError
from dpokit.data.rows import RowSkip
from dpokit.data.vision import vision_example

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys, timeout: float = 60.0) -> tuple[int, str]:
    """(exit status, stderr) of `dpokit ARGV` in-process; a run that does not end within `timeout` fails."""
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    worker.start()
    worker.join(timeout)
    assert result, f"dpokit {' '.join(argv)} did not end within {timeout} s (a hang on its input)"
    return result[0], capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "gemm_4bit" not in line]
    assert len(lines) == 1 and lines[0].startswith("dpokit: error:"), err
    return lines[0]


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


# --- the cases the hostile trial found ---------------------------------------------------------


def test_score_in_dev_zero_is_refused_in_one_line_not_read_until_memory_runs_out(tmp_path, capsys):
    code, err = run_cli(
        ["score", "--in", "/dev/zero", "--out", str(tmp_path / "o.jsonl"), "--scorer", "dpokit.demo.world:sentiment"],
        capsys,
    )
    assert code == 2 and "not a regular file" in one_error_line(err) and "--in /dev/zero" in err


@pytest.mark.parametrize("verb", ["pair", "score"])
def test_pair_and_score_in_a_fifo_are_refused_not_hung(verb, fifo, tmp_path, capsys):
    extra = ["--scorer", "dpokit.demo.world:sentiment"] if verb == "score" else []
    code, err = run_cli([verb, "--in", str(fifo), "--out", str(tmp_path / "o.jsonl"), *extra], capsys)
    assert code == 2 and "pipe (FIFO)" in one_error_line(err)


@pytest.mark.parametrize("option", ["--ifeval-prompts", "--multiturn-questions"])
def test_eval_suite_files_on_dev_zero_or_a_fifo_are_refused(option, fifo, capsys):
    for path in ("/dev/zero", str(fifo)):
        code, err = run_cli(["eval", "--policy", "demo:sentiment-sft", "--suite", "ifeval", option, path], capsys)
        assert code == 2 and f"{option} {path}: not a regular file" in one_error_line(err)


def test_a_data_path_that_is_a_symlink_to_a_device_fails_at_config_load_before_any_compute(tmp_path, capsys):
    link = tmp_path / "prefs.jsonl"
    link.symlink_to("/dev/zero")
    out = tmp_path / "run"
    code, err = run_cli(["train", "demo", f"data.path={link}", f"out_dir={out}"], capsys)
    assert code == 2 and "data.path" in one_error_line(err) and "device" in err
    assert not out.exists()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (a decompression bomb's header) and whose pixels are absent."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _image_row(path: str) -> dict:
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour"}]}]
    return {
        "images": [path],
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "blue"}],
    }


def _skip_reason(row: dict, folder: Path, roots: tuple[str, ...] = ()) -> str:
    with pytest.raises(RowSkip) as skip:
        vision_example(row, "rows.jsonl:1", str(folder), roots)
    return skip.value.reason


def test_image_paths_in_rows_are_confined_to_the_data_folder(tmp_path, monkeypatch):
    from PIL import Image

    data, elsewhere = tmp_path / "data", tmp_path / "cwd"
    data.mkdir(), elsewhere.mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(elsewhere / "red.png")
    monkeypatch.chdir(elsewhere)  # ./red.png exists here, and must not be used for a row of data/rows.jsonl
    assert "not found" in _skip_reason(_image_row("red.png"), data)
    assert "outside the data folder" in _skip_reason(_image_row("../../../../etc/passwd"), data)
    assert "outside the data folder" in _skip_reason(_image_row("/dev/zero"), data)
    (data / "escape.png").symlink_to(elsewhere / "red.png")
    assert "outside the data folder" in _skip_reason(_image_row("escape.png"), data)
    # the folder allowed by data.image_root is read
    example = vision_example(_image_row(str(elsewhere / "red.png")), "rows.jsonl:1", str(data), (str(elsewhere),))
    assert example.images[0] == (elsewhere / "red.png").read_bytes()


def test_a_non_image_and_a_decompression_bomb_are_counted_skips_not_tracebacks(tmp_path):
    (tmp_path / "passwd.png").write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert "not a readable image" in _skip_reason(_image_row("passwd.png"), tmp_path)
    (tmp_path / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    assert "pixel limit" in _skip_reason(_image_row("bomb.png"), tmp_path)


def test_tools_nested_ten_thousand_deep_are_a_counted_skip_in_training_and_the_doctor(tmp_path):
    from dpokit.doctor import run_doctor

    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    rows = [good, dict(good, tools="[" * 10000 + "]" * 10000)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_preferences(str(path))
    assert len(examples) == 1 and report.rows_skipped == 1
    [reason] = report.skipped
    assert "nested more than" in reason
    doctor = run_doctor(str(path), sample_size=0)  # raised RecursionError before
    [load] = [check for check in doctor.checks if check.name == "dropped_rows"]
    assert "1 of 2 rows" in load.summary and "nested more than" in load.summary


def test_max_rows_stops_reading_instead_of_parsing_the_whole_file(tmp_path):
    good = json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    path = tmp_path / "d.jsonl"
    path.write_text((good + "\n") * 3 + "this line is not JSON, and is never read\n")
    with pytest.raises(DataError):  # the whole file is read without a cap
        load_preferences(str(path))
    groups, report = load_preference_groups(str(path), max_rows=2)
    assert len(groups) == 2 and report.rows_read == 2 and report.read_stopped_at == 2
    assert report.rows_skipped == 0 and report.to_dict()["read_stopped_at_max_rows"] == 2


# --- the gateway's own rules ---------------------------------------------------------------------


def test_a_gzip_that_inflates_past_the_limit_is_stopped_at_the_limit(tmp_path, monkeypatch):
    from dpokit.inputs import InputError, gateway

    monkeypatch.setitem(gateway.KINDS, "data", gateway.InputKind("data", 1_000_000, "test data"))
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write((b"{}\n" * 1_000_000))  # 3 MB inflated, a few KB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match="read past the"):
        list(gateway.iter_lines(path, "data"))


def test_json_depth_is_measured_outside_strings():
    from dpokit.inputs import JSONTooDeep, loads_bounded
    from dpokit.inputs.json_text import json_depth

    assert json_depth('{"a": "[[[[[[", "b": [[1]]}') == 3
    assert loads_bounded('["' + "[" * 500 + '"]') == ["[" * 500]
    with pytest.raises(JSONTooDeep):
        loads_bounded("[" * 201 + "]" * 201)


# --- every input of every verb (the generated table of docs/robustness.md) -------------------------


@pytest.fixture(scope="module")
def robustness_rows():
    import shutil
    import tempfile

    from dpokit.robustness import table

    folder = Path(tempfile.mkdtemp(prefix="dpokit-hostile-"))  # not under pytest's 0700 folder: `nobody` reads it
    try:
        yield table(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_every_input_refuses_or_skips_every_hostile_file(robustness_rows):
    wrong = [
        (entry.name, case, verdict, message)
        for entry, case, verdict, message in robustness_rows
        if verdict not in ("refused", "skipped", "noted", "n/a")
        or (verdict == "n/a") != (case == "path outside the data folder" and entry.reader != "image")
    ]
    assert not wrong, wrong


def test_the_docs_table_is_the_generated_one(robustness_rows):
    from dpokit.robustness import BEGIN, END, markdown

    page = (ROOT / "docs" / "robustness.md").read_text()
    shown = page[page.index(BEGIN) + len(BEGIN) : page.index(END)].strip()
    assert shown == markdown(robustness_rows), "rerun: python -m dpokit.robustness --write docs/robustness.md"


# Options that name something other than a file dpokit reads: models (read by transformers through
# models.py's checks), output paths, URLs, names. A new option must be listed in INPUTS or here.
NOT_FILES = {
    "model",
    "policy",
    "reference",
    "baseline",
    "local_judge",
    "out",
    "out_dir",
    "judge_url",
    "judge_model",
    "api_key_env",
    "gpu_memory",
    "run_dir",
    "split",
    "prompt_column",
}


def test_every_file_option_of_every_verb_is_in_the_gateway_list():
    import argparse

    from dpokit.cli import build_parser
    from dpokit.inputs.catalog import INPUTS

    listed = {(verb, entry.dest) for entry in INPUTS for verb in entry.verbs if entry.dest}
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for verb, parser in verbs.choices.items():
        for action in parser._actions:
            # any option that takes a value which is not a number or a fixed choice may name a file (a Path type too)
            takes_text = (
                action.nargs != 0 and action.type not in (int, float) and action.dest not in ("help", "overrides")
            )
            if takes_text and not action.choices and action.dest not in NOT_FILES and (verb, action.dest) not in listed:
                missing.append((verb, action.option_strings or action.dest))
    assert not missing, f"add these to dpokit/inputs/catalog.py INPUTS (or to NOT_FILES with a reason): {missing}"


def test_image_root_is_saved_resolved_like_every_other_path(tmp_path, monkeypatch):
    from dpokit.config import load_config
    from dpokit.config.paths import resolve_paths

    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(load_config(None, {"data.image_root": ["pictures", str(tmp_path / "abs")]}))
    assert cfg.data.image_root == [str(tmp_path / "pictures"), str(tmp_path / "abs")]


def test_corrupt_gzip_json_and_csv_are_one_line_errors_not_tracebacks(tmp_path):
    import gzip as gz

    for name in ("rows.json.gz", "rows.csv.gz"):
        good = gz.compress(b'[{"prompt": "Q", "chosen": "a", "rejected": "b"}]' * 50)
        (tmp_path / name).write_bytes(good[: len(good) // 2])  # cut off mid-stream
        with pytest.raises(DataError, match="cannot read file"):
            load_preferences(str(tmp_path / name))
        (tmp_path / name).write_bytes(b"this is not gzip at all")
        with pytest.raises(DataError, match="cannot read file"):
            load_preferences(str(tmp_path / name))


def test_a_nul_byte_in_an_image_path_and_hub_rows_relative_paths_are_counted_skips(tmp_path, monkeypatch):
    from PIL import Image

    assert "NUL byte" in _skip_reason(_image_row("a\x00b.png"), tmp_path)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "red.png")  # in the current directory: a hub row must not reach it
    with pytest.raises(RowSkip) as skip:
        vision_example(_image_row("red.png"), "owner/dataset:1", None)
    assert "no folder" in skip.value.reason


def test_huge_integers_in_tools_are_a_counted_skip(tmp_path):
    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, tools='[{"x": ' + "9" * 5000 + "}]")) + "\n")
    examples, report = load_preferences(str(path))
    assert len(examples) == 1 and report.rows_skipped == 1 and "cannot be read" in next(iter(report.skipped))


def test_the_report_of_a_damaged_run_directory_notes_what_it_cannot_read(tmp_path):
    from dpokit.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.69}\n' + "[" * 100000 + "\n" + '{"step": 2, "x": ' + "9" * 5000 + "}\n"
    )
    (run / "eval.json").write_text("[" * 100000)
    (run / "config.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("abcdefg", "bcdefgh")
        )
    )
    page = Path(build_report(str(run))).read_text()  # a RecursionError / ValueError / alias bomb traceback before
    assert "skipped 2 line(s)" in page and "could not be read" in page and "config.yaml is not shown" in page


def test_the_table_writer_reads_its_page_through_the_gateway_before_any_work(tmp_path, fifo):
    """`python -m dpokit.robustness --write PAGE`: a device or a FIFO is refused at once (before the 30 s table), and
    a page elsewhere without the table's markers is refused and left as it was."""
    from dpokit.inputs import InputError
    from dpokit.robustness import main as write_table

    for page in ("/dev/zero", str(fifo)):
        with pytest.raises(InputError, match="not a regular file"):
            write_table(["--write", page])
    elsewhere = tmp_path / "outside" / "notes.md"
    elsewhere.parent.mkdir()
    elsewhere.write_text("my own notes\n")
    with pytest.raises(InputError, match="markers"):
        write_table(["--write", str(elsewhere)])
    assert elsewhere.read_text() == "my own notes\n"
