"""`run_doctor`: every check on one preference file, in the order a user would fix things.

Loading problems first (layouts, dropped rows), then what the rows say
(identical, duplicated, length-biased pairs), then what tokenisation does to
them (truncation, chat-template pitfalls), then what the reference model thinks
of them. Each stage runs only when its inputs exist: without a model the token
and reference checks are reported as skipped, never silently left out.
"""

from __future__ import annotations

import dataclasses

from typing import Any

from dpokit.config import Config, load_config
from dpokit.data.layouts import load_preferences
from dpokit.data.records import DataError, PreferenceExample, SkipReport
from dpokit.data.token_health import measure_token_health, model_context_length, paired_rows
from dpokit.data.vision import load_vision_preferences
from dpokit.doctor.reference_checks import reference_logps_check, reference_preference_check, sample_pairs, score_pairs
from dpokit.doctor.report import CheckResult, DoctorReport
from dpokit.doctor.text_checks import (
    dropped_rows_check,
    duplicates_check,
    identical_pairs_check,
    layouts_check,
    length_bias_check,
    word_lengths,
)
from dpokit.config import DoctorConfig
from dpokit.doctor.token_checks import (
    completion_end_check,
    context_length_check,
    special_tokens_check,
    template_prefix_check,
    token_health_check,
    truncation_check,
    unknown_tokens_check,
)
from dpokit.doctor.token_scan import TokenScan, scan_tokens
from dpokit.doctor.tool_checks import completion_render_check, tools_check
from dpokit.model_source import ModelLoadError
from dpokit.models import load_model_config, load_policy, load_tokenizer

TOKEN_CHECKS = (
    "token_health",
    "unknown_tokens",
    "truncation",
    "template_prefix",
    "special_tokens",
    "completion_end",
    "completion_render",
    "tools",
)
REFERENCE_CHECKS = ("reference_logps", "reference_preference")
DEFAULT_SAMPLE_SIZE = 256


def run_doctor(
    data_path: str,
    model: str | None = None,
    config_path: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    thresholds: DoctorConfig | None = None,
    tokenizer=None,
    reference_model=None,
    batch_size: int = 8,
) -> DoctorReport:
    """Check `data_path` for what would make a DPO run on it go wrong.

    model: a model folder or hub id; defaults to the config's model.name_or_path.
    config_path / overrides: as for `dpokit train` (data.layout, data.columns,
    data.max_length, data.max_prompt_length, data.eval_fraction are read).
    sample_size: pairs scored by the reference model (0 skips loading it).
    tokenizer / reference_model: already-loaded objects, used instead of `model`.
    """
    cfg = load_config(config_path, overrides)
    thresholds = thresholds or cfg.doctor
    model_name = model or cfg.model.name_or_path or None
    data_path, model_name = _resolve_demo_paths(data_path, model_name)
    report = DoctorReport(data_path=data_path, model=model_name)
    loaded = _load_rows(report, data_path, cfg)
    if loaded is None:
        return report
    examples, load_skips = loaded
    report.add(layouts_check(load_skips, examples))
    if cfg.data.vision:
        return _image_rows_report(report, examples, load_skips, cfg, thresholds, reference_model, model_name)
    if tokenizer is None and model_name:
        tokenizer = load_tokenizer(_with_model(cfg, model_name))
    scan = _scan(examples, tokenizer, cfg, report)
    report.add(dropped_rows_check(load_skips, scan.skips if scan else None, thresholds))
    report.add(identical_pairs_check(examples))
    report.add(duplicates_check(examples))
    if scan is not None:
        _token_checks(
            report, scan, examples, tokenizer, cfg, thresholds, _model_context(cfg, reference_model, model_name)
        )
    else:
        report.add(length_bias_check(*word_lengths(examples), "words", thresholds))
        _skip(report, TOKEN_CHECKS, "needs a tokenizer")
    _context_check(report, cfg, reference_model, model_name)
    _reference_checks(
        report, scan, tokenizer, reference_model, model_name, cfg, sample_size, seed, thresholds, batch_size
    )
    return report


def _load_rows(report: DoctorReport, data_path: str, cfg: Config) -> tuple[list[PreferenceExample], SkipReport] | None:
    """The rows as dpokit train reads them; None, with the `load` check failed, when nothing in the file can be read."""
    try:
        if cfg.data.vision:  # image rows: read as dpokit train reads them (prompt/images/chosen/rejected)
            return load_vision_preferences(data_path, cfg.data.split, image_roots=tuple(cfg.data.image_root))
        return load_preferences(
            data_path, split=cfg.data.split, columns=cfg.data.columns or None, layout=cfg.data.layout
        )
    except DataError as error:
        report.add(
            CheckResult(
                "load",
                "fail",
                str(error),
                "Nothing in this file can be trained on; fix the problem "
                "named above (see the expected columns) or map renamed columns with data.columns.",
            )
        )
        return None


def _token_checks(
    report: DoctorReport,
    scan: TokenScan,
    examples: list[PreferenceExample],
    tokenizer,
    cfg: Config,
    thresholds: DoctorConfig,
    context: int | None,
) -> None:
    """The tokenizer's checks (TOKEN_CHECKS, and length_bias counted in tokens), in report order."""
    health = measure_token_health(paired_rows(examples, scan.pairs), tokenizer)
    report.add(token_health_check(health))
    report.add(unknown_tokens_check(health, cfg.data.max_unknown_token_rate, thresholds.unknown_token_warn_rate))
    report.add(length_bias_check(scan.chosen_lengths, scan.rejected_lengths, "tokens", thresholds))
    report.add(truncation_check(scan, cfg.data.max_length, cfg.data.max_prompt_length, thresholds, context))
    report.add(template_prefix_check(scan))
    report.add(special_tokens_check(scan))
    report.add(completion_end_check(scan))
    report.add(completion_render_check(scan.skips, scan.rows))
    report.add(tools_check(examples, tokenizer))


def _resolve_demo_paths(data_path: str, model_name: str | None) -> tuple[str, str | None]:
    """`demo:` names (as in the shipped demo config) -> the built demo assets, exactly as training resolves them."""
    from dpokit.demo.assets import resolve_demo_names

    resolved = resolve_demo_names({"data.path": data_path, "model.name_or_path": model_name})
    return resolved["data.path"], resolved["model.name_or_path"]


def _with_model(cfg: Config, model_name: str, **extra: Any) -> Config:
    return load_config(cfg, {"model.name_or_path": model_name, **extra})


def _scan(examples: list[PreferenceExample], tokenizer, cfg: Config, report: DoctorReport) -> TokenScan | None:
    if tokenizer is None:
        report.notes.append(
            "no model given (--model or model.name_or_path): token and reference checks skipped; "
            "lengths are counted in words"
        )
        return None
    try:
        return scan_tokens(examples, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    except DataError as error:  # e.g. conversational rows and a tokenizer without a chat template
        report.add(CheckResult("tokenisation", "fail", str(error), "Training would stop here with the same error."))
        return None


def _model_context(cfg: Config, reference_model, model_name: str | None) -> int | None:
    """The model's context length, for advice that must stay within it; None when unknown (the context_length
    check says why)."""
    model_config = getattr(reference_model, "config", None)
    if model_config is None and model_name:
        try:
            model_config = load_model_config(dataclasses.replace(cfg.model, name_or_path=model_name))
        except ModelLoadError:
            return None
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    return model_context_length(model_config) if model_config is not None else None


def _context_check(report: DoctorReport, cfg: Config, reference_model, model_name: str | None) -> None:
    """data.max_length against the model's context, from the loaded reference's config or the model's config.json."""
    model_config = getattr(reference_model, "config", None)
    if model_config is None and model_name:
        try:  # reads config.json only: no weights, no remote code
            model_config = load_model_config(dataclasses.replace(cfg.model, name_or_path=model_name))
        except ModelLoadError as error:  # a hub id offline, custom code: the other checks still run
            report.add(CheckResult("context_length", "skip", f"cannot read the model's config ({error})"))
            return
    if model_config is None:
        report.add(CheckResult("context_length", "skip", "needs a model (--model or model.name_or_path)"))
        return
    report.add(context_length_check(cfg.data.max_length, model_config))


def _image_rows_report(
    report: DoctorReport,
    examples,
    load_skips,
    cfg: Config,
    thresholds: DoctorConfig,
    reference_model,
    model_name: str | None,
) -> DoctorReport:
    """data.vision=true: the row checks on the text (images count in the duplicate check), lengths in words, the
    context length. The token and reference checks need the model's processor and a vision forward pass, which
    dpokit train runs itself (its token health check and context check read the processor's tokens)."""
    report.add(
        dropped_rows_check(
            load_skips, None, thresholds, untokenised="image rows are tokenised by the model's processor"
        )
    )
    report.add(identical_pairs_check(examples))
    report.add(duplicates_check(examples))
    report.add(length_bias_check(*word_lengths(examples), "words", thresholds))
    why = "image rows (data.vision): tokenised by the model's processor; dpokit train checks their tokens before any compute"
    _skip(report, TOKEN_CHECKS, why)
    _context_check(report, cfg, reference_model, model_name)
    _skip(
        report,
        REFERENCE_CHECKS,
        "image rows (data.vision): the reference checks need a vision forward pass, not run by the doctor",
    )
    return report


def _skip(report: DoctorReport, names: tuple[str, ...], why: str) -> None:
    for name in names:
        report.add(CheckResult(name, "skip", why))


def _reference_checks(
    report: DoctorReport,
    scan: TokenScan | None,
    tokenizer,
    reference_model,
    model_name: str | None,
    cfg: Config,
    sample_size: int,
    seed: int,
    thresholds: DoctorConfig,
    batch_size: int,
) -> None:
    """Score a seeded sample of the tokenised pairs with the reference (the model before training)."""
    if scan is None or not scan.pairs:
        _skip(report, REFERENCE_CHECKS, "needs tokenised pairs")
        return
    if sample_size <= 0 or (reference_model is None and not model_name):
        _skip(report, REFERENCE_CHECKS, "needs a model" if sample_size > 0 else "sample size 0")
        return
    if reference_model is None:
        reference_model = _load_reference(cfg, model_name)
    sample = sample_pairs(scan.pairs, sample_size, seed)
    if len(sample) < len(scan.pairs):
        report.notes.append(f"reference checks scored a seeded sample of {len(sample)} of {len(scan.pairs)} pairs")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    scores = score_pairs(reference_model, sample, pad_id, batch_size)
    report.add(reference_logps_check(scores, thresholds))
    report.add(reference_preference_check(scores, thresholds))


def _load_reference(cfg: Config, model_name: str):
    """The model as training's reference sees it: the base weights (no LoRA), in eval mode, on the GPU if any."""
    import torch

    model = load_policy(_with_model(cfg, model_name, **{"lora.enabled": False, "train.gradient_checkpointing": False}))
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model


__all__ = ["DEFAULT_SAMPLE_SIZE", "REFERENCE_CHECKS", "TOKEN_CHECKS", "run_doctor"]
