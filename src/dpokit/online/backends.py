"""Generation backends for `dpokit sample`: one method, `generate(texts, cfg, seed)` -> num_samples
`generation.Sample`s per text, prompt-major.

Hugging Face `generate` through `dpokit.generation.sample` (default), or vLLM when it is installed
and a GPU is present (`backend: auto` picks it then; `vllm` requires it). The vLLM path is a
guarded import, untested on CPU-only machines.
"""

from __future__ import annotations

import importlib.util

import torch

from dpokit.config import SamplingConfig
from dpokit.generation import Sample, sample
from dpokit.online.loading import ModelTrust, load_model, load_tokenizer, resolve_model_path


class HFBackend:
    """`transformers` generate through `dpokit.generation.sample` (left padding, seeded, EOS-trimmed)."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, texts: list[str], cfg: SamplingConfig, seed: int) -> list:
        """-> num_samples `generation.Sample`s per text, prompt-major."""
        return sample(
            self.model,
            self.tokenizer,
            texts,
            num_samples=cfg.num_samples,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
            batch_size=max(1, len(texts) * cfg.num_samples),
        )


class VLLMBackend:  # pragma: no cover - needs vllm and a GPU
    """vLLM offline generation; same output as HFBackend (token ids kept, EOS included when generated)."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, **llm_kwargs):
        from vllm import LLM  # optional: only installed on GPU machines

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, tokenizer=model_path, **llm_kwargs)

    def generate(self, texts: list[str], cfg: SamplingConfig, seed: int) -> list:
        from vllm import SamplingParams  # optional, as above

        eos = self.tokenizer.eos_token_id
        params = SamplingParams(
            n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed
        )
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        samples = []
        for text, ids, out in zip(texts, prompt_ids, outputs):
            for c in out.outputs:
                completion_ids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not completion_ids or completion_ids[-1] != eos):
                    completion_ids.append(eos)  # vLLM may leave the stop token out of token_ids
                samples.append(Sample(text, c.text, list(ids), completion_ids, finished))
        return samples


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_backend(cfg: SamplingConfig, model_spec: str, model=None, tokenizer=None, trust: ModelTrust = ModelTrust()):
    """The backend `cfg.backend` asks for; `auto` = vLLM when installed with a GPU (and a model path), else HF."""
    use_vllm = cfg.backend == "vllm" or (cfg.backend == "auto" and model is None and vllm_available())
    if use_vllm:
        if not vllm_available():
            raise RuntimeError("backend 'vllm' needs the vllm package and a CUDA GPU; use backend 'hf'")
        # vLLM reads the weights itself: the tokenizer load runs dpokit's checks on the folder first
        tokenizer = tokenizer or load_tokenizer(model_spec, trust)
        return VLLMBackend(
            resolve_model_path(model_spec), tokenizer, seed=cfg.seed, trust_remote_code=trust.trust_remote_code
        )
    if model is None:
        model, tokenizer = load_model(model_spec, trust)
    return HFBackend(model, tokenizer)
