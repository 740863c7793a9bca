"""Image rows (data.vision): exact token ids and label masks, pixel values per row, and image tokens never truncated."""

from __future__ import annotations

import pytest
import torch
from vision_assets import colour_rows, image_prompt, tiny_llava_dir, write_images, write_rows

from dpokit.config import load_config
from dpokit.data.collate import IGNORE_INDEX
from dpokit.data.records import DataError, SkipReport
from dpokit.data.vision import (
    IMAGE_TRUNCATION,
    collate_vision_pairs,
    load_vision_preferences,
    prepare_vision_data,
    tokenize_vision_pairs,
)
from dpokit.model_source import ModelLoadError
from dpokit.models import load_processor
from dpokit.tiny_vision import IMAGE_TOKENS

N_IMAGE = IMAGE_TOKENS  # 16 image tokens per 16x16 image in 4x4 patches


@pytest.fixture(scope="module")
def processor():
    return load_processor(load_config({"model": {"name_or_path": str(tiny_llava_dir())}, "data": {"vision": True}}))


def ids(processor, text: str) -> list[int]:
    vocab = processor.tokenizer.get_vocab()
    return [vocab[w] for w in text.split()]


def cfg_for(path, **data):
    return load_config(
        {"model": {"name_or_path": str(tiny_llava_dir())}, "data": {"path": str(path), "vision": True, **data}}
    )


def test_prompt_ids_expand_each_image_and_labels_cover_only_the_completion(tmp_path, processor):
    write_images(tmp_path)
    path = write_rows(tmp_path / "rows.jsonl", colour_rows(2))
    data = prepare_vision_data(cfg_for(path, max_length=64), processor)
    first, second = data.train
    image = ids(processor, "<image>")
    expected_prompt = (
        ids(processor, "<|im_start|> user")
        + image * N_IMAGE
        + ids(processor, "what colour is the square <|im_end|> <|im_start|> assistant")
    )
    assert first.prompt_ids == expected_prompt
    assert first.chosen_ids == ids(processor, "it is red <|im_end|>")
    assert first.rejected_ids == ids(processor, "it is blue <|im_end|>")
    assert second.chosen_ids == ids(processor, "it is blue <|im_end|>")
    assert first.vision["pixel_values"].shape == (1, 3, 16, 16)

    batch = collate_vision_pairs([first, second], processor.tokenizer.pad_token_id)
    n_prompt, n = len(expected_prompt), len(expected_prompt) + 4
    assert batch["input_ids"].shape == (4, n)  # [chosen; rejected], all rows the same length here
    assert batch["input_ids"][0].tolist() == expected_prompt + first.chosen_ids
    assert batch["input_ids"][2].tolist() == expected_prompt + first.rejected_ids
    for row, completion in enumerate([first.chosen_ids, second.chosen_ids, first.rejected_ids, second.rejected_ids]):
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * n_prompt + completion
    # each row's image, in row order: pair b's pixels are rows b and B + b
    expected_pixels = torch.cat([first.vision["pixel_values"], second.vision["pixel_values"]] * 2)
    torch.testing.assert_close(batch["pixel_values"], expected_pixels, rtol=0, atol=0)
    red, blue = batch["pixel_values"][0], batch["pixel_values"][1]
    assert (
        red[0].mean() > red[2].mean() and blue[2].mean() > blue[0].mean()
    )  # the red and the blue image, in that order


def test_two_images_in_one_prompt_and_text_before_the_image(tmp_path, processor):
    write_images(tmp_path)
    prompt = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": " a"},
                {"type": "image"},
                {"type": "text", "text": " what colour"},
            ],
        }
    ]
    row = {"images": ["red.png", "green.png"], "prompt": prompt, "chosen": "it is red", "rejected": "it is green"}
    examples, _ = load_vision_preferences(str(write_rows(tmp_path / "two.jsonl", [row])))
    assert len(examples[0].images) == 2
    pairs, _ = tokenize_vision_pairs(examples, processor, 128, 100, _report(examples))
    image = ids(processor, "<image>")
    assert pairs[0].prompt_ids == ids(processor, "<|im_start|> user") + image * N_IMAGE + ids(
        processor, "a"
    ) + image * N_IMAGE + ids(processor, "what colour <|im_end|> <|im_start|> assistant")
    assert pairs[0].vision["pixel_values"].shape == (2, 3, 16, 16)
    batch = collate_vision_pairs(pairs, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (4, 3, 16, 16)  # two images per row, two rows


def _report(examples):
    report = SkipReport()
    report.rows_read = report.rows_used = len(examples)
    return report


def test_prompt_truncation_that_would_cut_image_tokens_is_a_counted_skip(tmp_path, processor):
    write_images(tmp_path)
    rows = colour_rows(3)
    rows[1]["prompt"] = image_prompt(before="a picture of a picture of a picture of")  # 9 text tokens before the image
    path = write_rows(tmp_path / "rows.jsonl", rows)
    # prompts: 2 + 16 + 8 = 26 tokens; the long one 35. max_prompt_length=27 cuts 8 tokens of the long one's leading text
    # (kept, all image tokens intact) and nothing else; 20 would cut into every row's image tokens.
    data = prepare_vision_data(cfg_for(path, max_length=64, max_prompt_length=27), processor)
    assert len(data.train) == 3 and data.summary["train"]["truncated"]["prompt"] == 1
    long_prompt = data.train[1].prompt_ids
    assert len(long_prompt) == 27 and long_prompt.count(ids(processor, "<image>")[0]) == N_IMAGE
    assert long_prompt[:4] == ids(processor, "a picture of <image>")  # the cut is in the text before the image
    data = prepare_vision_data(cfg_for(path, max_length=64, max_prompt_length=20), processor)
    assert not data.train and data.summary["train"]["skipped_by_reason"] == {IMAGE_TRUNCATION: 3}  # never a cut image
    rows.append(dict(colour_rows(1)[0], prompt=[{"role": "user", "content": " what colour is the square"}], images=[]))
    path = write_rows(tmp_path / "mixed.jsonl", rows)  # a text-only row keeps its place
    data = prepare_vision_data(cfg_for(path, max_length=64, max_prompt_length=20), processor)
    summary = data.summary["train"]
    assert summary["skipped_by_reason"] == {IMAGE_TRUNCATION: 3} and summary["pairs"] == 1
    assert summary["skipped_examples"][IMAGE_TRUNCATION][0].startswith(
        f"{path}:1 (prompt: 26 tokens, image tokens from 2)"
    )
    assert summary["rows_read"] == 4 and summary["rows_used"] == 1
    with pytest.raises(DataError, match=f"{path}:1: {IMAGE_TRUNCATION}"):
        prepare_vision_data(cfg_for(path, max_length=64, max_prompt_length=20, strict=True), processor)


def test_bad_image_rows_are_skipped_with_their_reason(tmp_path):
    write_images(tmp_path)
    good = colour_rows(1)[0]
    rows = [
        good,
        dict(good, images=["red.png", "blue.png"]),  # two images, one image part
        dict(good, images=["missing.png"]),
        dict(good, chosen=[{"role": "assistant", "content": [{"type": "image"}]}]),
        dict(good, prompt="what colour is the square"),
        dict(good, images=[str(tmp_path / "green.png")]),
    ]  # an absolute path
    examples, report = load_vision_preferences(str(write_rows(tmp_path / "bad.jsonl", rows)))
    assert len(examples) == 2 and examples[1].images == [(tmp_path / "green.png").read_bytes()]
    assert report.skipped == {
        "the row has 2 images but its prompt has 1 image parts": 1,
        "image file not found (no such file or folder)": 1,
        "image parts in chosen/rejected are not supported (images belong to the prompt)": 1,
        "data.vision rows need a prompt of chat messages (with {'type': 'image'} parts for their images)": 1,
    }
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'images': the row has 2 images"):
        load_vision_preferences(str(tmp_path / "bad.jsonl"), strict=True)


def test_images_as_bytes_and_datasets_image_dicts(tmp_path):
    from dpokit.data.vision import vision_example

    raw = write_images(tmp_path)["blue"].read_bytes()
    for images in (raw, [raw], [{"bytes": raw, "path": None}]):
        example = vision_example(dict(colour_rows(1)[0], images=images), "rows:1", str(tmp_path))
        assert example.images == [raw]


def test_a_text_model_folder_is_refused_for_data_vision():
    from tiny_assets import tiny_model_dir

    with pytest.raises(ModelLoadError, match="vision-language processor"):
        load_processor(load_config({"model": {"name_or_path": str(tiny_model_dir())}, "data": {"vision": True}}))


def test_the_context_check_reads_the_language_models_config():
    from transformers import AutoConfig

    from dpokit.data.token_health import context_length_problem

    config = AutoConfig.from_pretrained(tiny_llava_dir())  # LLaVA: max_position_embeddings=512 in text_config only
    assert "exceeds the model's context length of 512 tokens" in context_length_problem(1024, config, 600)
    assert context_length_problem(512, config) is None


def test_sampling_and_unpaired_objectives_are_refused_with_images():
    from dpokit.config import ConfigError

    for overrides in (
        {"loss": {"type": "kto"}},
        {"train": {"task": "sft"}},
        {"train": {"eval_generate": 2}},
        {"data": {"vision": True, "layout": "sharegpt"}},
    ):
        with pytest.raises(ConfigError, match="data.vision"):
            load_config({"data": {"vision": True}, **overrides})


def test_image_rows_without_data_vision_are_refused_with_the_key_to_set(tmp_path):
    from dpokit.data.layouts import load_preferences

    write_images(tmp_path)
    with pytest.raises(DataError, match=r"image content parts: set data.vision=true"):
        load_preferences(str(write_rows(tmp_path / "rows.jsonl", colour_rows(2))))


def test_the_doctor_reads_image_rows_with_data_vision_and_counts_a_prompt_per_image(tmp_path):
    from dpokit.doctor import format_report, run_doctor

    write_images(tmp_path)
    data = write_rows(tmp_path / "pairs.jsonl", colour_rows(6))  # one prompt text, three images, each twice
    report = run_doctor(
        str(data), model=str(tiny_llava_dir()), sample_size=0, overrides=["data.vision=true", "data.max_length=64"]
    )
    assert report.check("dropped_rows").verdict == "ok", format_report(report)
    duplicates = report.check("duplicates").numbers
    assert (
        duplicates["distinct_prompts"] == 3 and duplicates["repeated_prompts"] == 3
    )  # the text alone would say 1 and 5
    assert report.check("token_health").verdict == "skip" and "data.vision" in report.check("token_health").summary
    assert report.check("context_length").verdict == "ok"
    assert report.verdict != "fail"
    # Without data.vision every row is dropped, and the report says which key to set.
    plain = run_doctor(str(data), model=str(tiny_llava_dir()), sample_size=0)
    assert "data.vision" in format_report(plain) and plain.verdict == "fail"
