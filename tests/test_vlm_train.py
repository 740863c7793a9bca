"""A tiny LLaVA trains on image rows: the step's loss equals the DPO loss worked out row by row, the reference
cache gives the live reference's numbers and is keyed by the images, LoRA adapts only the language model."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from vision_assets import colour_rows, tiny_llava_dir, write_images, write_rows

from dpokit.config import load_config
from dpokit.models import load_policy, load_tokenizer, load_weights
from dpokit.ref_cache.build import ensure_reference_cache, precompute_reference
from dpokit.steps.base import StepContext
from dpokit.steps import VisionPairedStep, step_for
from dpokit.training.loop import train

BETA = 0.1


def rows_with_lengths(n: int) -> list[dict]:
    rows = colour_rows(n)
    rows[0]["chosen"] = [
        {"role": "assistant", "content": "it is a red square"}
    ]  # rows of other lengths: padding matters
    return rows


def config(tmp_path, **overrides):
    base = {
        "model": {"name_or_path": str(tiny_llava_dir())},
        "data": {"path": str(tmp_path / "rows.jsonl"), "vision": True, "max_length": 64},
        "loss": {"beta": BETA},
        "train": {"max_steps": 5, "batch_size": 2, "logging_steps": 1, "progress_bar": False, "save_steps": 0},
        "optim": {"lr": 1e-3},
        "speed": {"ref_cache_dir": str(tmp_path / "cache")},
        "out_dir": str(tmp_path / "run"),
    }
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(base)


def completion_logp(model, pair, completion: list[int]) -> torch.Tensor:
    """sum_t log p(y_t | prompt, image, y_<t) of one row on its own: no batch, no padding."""
    ids = torch.tensor([pair.prompt_ids + completion])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pair.vision["pixel_values"]).logits[
        0
    ]
    logps = F.log_softmax(logits[:-1].float(), dim=-1).gather(-1, ids[0, 1:, None])[
        :, 0
    ]  # log p(token t+1 | tokens <= t)
    return logps[len(pair.prompt_ids) - 1 :].sum()


def per_row_dpo_loss(policy, reference, pairs) -> torch.Tensor:
    """Eq. 7 of the DPO paper, one pair at a time: -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))."""
    losses = []
    for pair in pairs:
        margin = (
            completion_logp(policy, pair, pair.chosen_ids) - completion_logp(reference, pair, pair.chosen_ids)
        ) - (completion_logp(policy, pair, pair.rejected_ids) - completion_logp(reference, pair, pair.rejected_ids))
        losses.append(-F.logsigmoid(BETA * margin))
    return torch.stack(losses).mean()


def step_loss(cfg, policy, reference, pairs) -> torch.Tensor:
    step = step_for(cfg)
    batch = step.collate(pairs, load_tokenizer(cfg).pad_token_id)
    out, _ = step.forward(policy, reference, batch, StepContext(cfg))
    return out.losses.mean()


def test_five_steps_learn_and_the_step_loss_equals_the_per_row_loss(tmp_path, capsys):
    write_images(tmp_path)
    write_rows(tmp_path / "rows.jsonl", rows_with_lengths(6))
    cfg = config(tmp_path, speed={"ref_cache": False})
    assert isinstance(step_for(cfg), VisionPairedStep)
    result = train(cfg)
    assert (
        "speed.packing, speed.prefix_sharing, speed.chunked_logps do not support image rows" in capsys.readouterr().out
    )
    losses = [
        json.loads(line)["loss"]
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(losses) == 5 and abs(losses[0] - 0.6931) < 1e-3 and losses[-1] < losses[0] - 0.02  # it learned

    # the trained policy against the untrained reference: the batched step's loss is the row-by-row loss
    policy = load_weights(
        load_config({"model": {"name_or_path": str(result.model_dir)}, "data": {"vision": True}})
    ).eval()
    reference = load_weights(cfg).eval()
    pairs = step_for(cfg).prepare(cfg, None).train[:3]
    with torch.no_grad():
        batched, by_row = step_loss(cfg, policy, reference, pairs), per_row_dpo_loss(policy, reference, pairs)
    assert by_row < 0.69  # the trained policy differs from its reference
    torch.testing.assert_close(batched, by_row, rtol=1e-5, atol=1e-6)


def test_the_image_changes_the_loss(tmp_path):
    """The pixel values reach the model: the same token ids with another image give another loss."""
    write_images(tmp_path)
    write_rows(tmp_path / "rows.jsonl", colour_rows(3))
    cfg = config(tmp_path, speed={"ref_cache": False})
    policy, reference = (
        load_weights(cfg).eval(),
        load_weights(load_config({"model": {"name_or_path": str(tiny_llava_dir(1))}, "data": {"vision": True}})).eval(),
    )
    pairs = step_for(cfg).prepare(cfg, None).train
    swapped = [type(p)(**{**vars(p), "vision": pairs[(i + 1) % 3].vision}) for i, p in enumerate(pairs)]
    with torch.no_grad():
        assert abs(step_loss(cfg, policy, reference, pairs) - step_loss(cfg, policy, reference, swapped)) > 1e-6
        torch.testing.assert_close(
            step_loss(cfg, policy, reference, pairs), per_row_dpo_loss(policy, reference, pairs), rtol=1e-5, atol=1e-6
        )


def test_the_reference_cache_gives_the_live_numbers_and_a_changed_image_rebuilds_it(tmp_path):
    write_images(tmp_path)
    write_rows(tmp_path / "rows.jsonl", rows_with_lengths(6))
    live = train(config(tmp_path, speed={"ref_cache": False}, out_dir=str(tmp_path / "live")))
    cached = train(config(tmp_path, out_dir=str(tmp_path / "cached")))

    def read(run):
        return [
            json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
        ]

    for a, b in zip(read(live), read(cached)):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])

    cfg = config(tmp_path)
    tokenizer, step = load_tokenizer(cfg), step_for(cfg)
    data = step.prepare(cfg, tokenizer)
    policy = load_policy(cfg)
    again, _ = ensure_reference_cache(cfg, tokenizer, data, model=policy)
    assert not again.built  # the training run's cache, found again
    assert precompute_reference(cfg) == again.folder  # `dpokit precompute` prepares image rows the same way
    from PIL import Image

    Image.new("RGB", (20, 20), (250, 5, 5)).save(tmp_path / "red.png")  # another red: same size, same token ids
    changed_data = step.prepare(cfg, tokenizer)
    assert [p.prompt_ids for p in changed_data.train] == [p.prompt_ids for p in data.train]
    changed, attached = ensure_reference_cache(cfg, tokenizer, changed_data, model=policy)
    assert changed.built and changed.digest != again.digest
    assert all(
        p.reference is not None and "pixel_values" in p.vision for p in attached.train
    )  # the images stay with the pairs


def test_lora_adapts_only_the_language_model(tmp_path):
    write_images(tmp_path)
    write_rows(tmp_path / "rows.jsonl", colour_rows(4))
    cfg = config(
        tmp_path, lora={"enabled": True, "r": 4, "alpha": 8}, train={"max_steps": 2}, speed={"ref_cache": False}
    )
    policy = load_policy(cfg)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in policy.named_modules() if name.endswith(".lora_A")}
    assert adapted and all(".language_model." in name for name in adapted)
    assert not any("vision_tower" in name or "multi_modal_projector" in name for name in adapted)
    result = train(cfg)
    assert result.stop_reason is None and (result.model_dir / "adapter_config.json").exists()
    assert (result.model_dir / "processor_config.json").exists()  # the final folder loads with AutoProcessor
