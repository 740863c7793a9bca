"""Attention over padding-free rows (data/packing.py): packed units and prompt-shared pairs.

A row holds several *units*; a unit is one plain sequence, or one pair laid out as
[prompt, chosen, rejected] (prefix sharing). The rule, for query token q and key token k
of the same row:

    attend(q, k) = same unit  and  k <= q  and  (k is in the prompt  or  k and q are in the same branch)

so attention never crosses units, and a rejected token sees the prompt and the earlier
rejected tokens but no chosen token. Padding tokens attend only to themselves (a query
with no key at all would give NaN in SDPA; nothing reads their outputs).

How transformers 5 (read from 5.24's `masking_utils` and `modeling_llama`) takes such input:
  - `position_ids` are passed through to the rotary embedding as given, so restarting them
    per unit (and continuing the rejected tokens from the prompt end) is all RoPE needs.
  - a 4D `attention_mask` is used as is (`_preprocess_mask_arguments` returns early):
    boolean (True = attend) for `sdpa`, additive float for `eager`.
  - with `attention_mask=None` and restarting `position_ids` (no cache), transformers
    detects packed sequences itself: a block-diagonal causal mask for sdpa/eager/flex,
    and cu_seqlens (varlen kernels) for flash-attention, which needs batch size 1.
  - extra keyword arguments of the model's forward reach the attention function
    (`**kwargs` through LlamaModel -> decoder layer -> attention), also when a layer is
    recomputed under gradient checkpointing (the kwargs are bound into the checkpoint).

Backends, picked from `model.config._attn_implementation` by `attention_inputs` (a model loaded with
the default sdpa is switched to the backend `speed.attention` resolves to, `fast_attention`):
  sdpa (default on CPU, and on GPU without flash-attn): the model is switched once to `dpokit_sdpa`, a registered
      attention function that is exactly transformers' `sdpa_attention_forward` unless the
      call carries `dpokit_units`; then it runs one SDPA call per unit segment (`is_causal`
      on [prompt, chosen] and a bottom-right causal mask for the rejected branch over
      [prompt, rejected], built in linear memory: `rejected_branch_sdpa`). Cost is sum(unit^2)/2,
      not rows x width^2 as with a dense mask (measured 3.5x faster attention on CPU for 5 units
      per row), so rows can be as long as the
      whole micro-batch: by default every unit goes into one row and there is no padding at all.
      The 4D mask passed alongside is a (rows, 1, 1, 1) placeholder: no dense mask is built.
  eager: the dense rule as an additive float mask.
  flex_attention: a BlockMask built from the same rule. Forward tested on CPU under torch.compile
      (tests/test_flex_attention.py); torch 2.13 has no FlexAttention backward on CPU, so training
      with it needs a GPU.
  flash_attention_2/3/4 and hub kernels: rows flattened to one row, attention_mask None,
      restarting position_ids -> varlen kernels. Prefix sharing cannot be expressed as
      varlen segments, so `prefix_sharing` must be off there (`supports_prefix_sharing`).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

ATTENTION_NAME = "dpokit_sdpa"
_registered = False


def register() -> None:
    """Register `dpokit_sdpa` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, segment_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    _registered = True


def rejected_branch_sdpa(query, key, value, prompt_key, prompt_value, dropout: float = 0.0, scale=None):
    """SDPA of a rejected branch: query, key, value (..., b, D) its b tokens, prompt_key, prompt_value (..., p, D)
    its prompt's; rejected token i sees every prompt key and the rejected keys 0..i (causal, bottom right).

    The mask takes linear memory: with the rejected keys first and in reverse order (key j is token b - 1 - j), then
    the prompt's, query i sees key j iff i + j >= b - 1 (every prompt key, j >= b, is seen), so the additive mask
    is mask[i, j] = edge[i + j], a (b, b + p) view with strides (1, 1) of one vector of 2b + p elements (-inf, then
    0). torch's CPU flash kernel reads the view in place, where a dense bool mask, b x (p + b), was turned into a
    float one by SDPA and kept for the backward: quadratic in the length (docs/benchmarks.md, "The rejected
    branch's mask: linear memory"). On CUDA the efficient kernel copies the view into an aligned dense bias, as it
    did the bool mask: correct, quadratic there as before.
    """
    b, p = query.shape[-2], prompt_key.shape[-2]
    keys = torch.cat((key.flip(-2), prompt_key), dim=-2)
    values = torch.cat((value.flip(-2), prompt_value), dim=-2)
    edge = torch.full((2 * b + p,), float("-inf"), dtype=query.dtype, device=query.device)
    edge[max(b - 1, 0) :] = 0
    mask = edge.as_strided((b, b + p), (1, 1))
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=dropout, scale=scale)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def segment_sdpa_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, dpokit_units=None, **kwargs
):
    """transformers attention function: SDPA per unit when `dpokit_units` is given, else plain sdpa.

    query (R, Hq, L, D); key, value (R, Hkv, L, D); dpokit_units: tuple of (row, start, prompt, first, second).
    returns ((R, L, Hq, D), None) like transformers' sdpa_attention_forward.
    """
    if dpokit_units is None:  # every call but dpokit's own (generation, evaluation helpers): plain sdpa
        return _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    n_rows = query.shape[0]
    by_row: list[list[tuple]] = [[] for _ in range(n_rows)]
    for unit in dpokit_units:
        by_row[unit[0]].append(unit)
    rows = zip(query.unbind(0), key.unbind(0), value.unbind(0), by_row)
    out_rows = [_row_attention(q, k, v, units, dropout, scaling) for q, k, v, units in rows]
    out = torch.stack(out_rows) if n_rows > 1 else out_rows[0][None]
    return out.transpose(1, 2).contiguous(), None


def _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """transformers' sdpa_attention_forward, after refusing dpokit's placeholder mask that arrived without its units."""
    placeholder = attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2:] == (1, 1)
    if placeholder and query.shape[2] > 1:
        raise RuntimeError(
            f"{type(module).__name__} did not pass dpokit's packed-attention arguments to its attention "
            "function; run it on the plain step: speed.packing=false speed.prefix_sharing=false "
            "speed.chunked_logps=false speed.ref_cache=false"
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _row_runs(units, width: int) -> tuple[list[int], list]:
    """One row's runs in order: (sizes, kinds), kind None for padding, (prompt, first, second) for a unit's
    [prompt + first] run, "second" for its [second] run (present when second > 0)."""
    sizes, kinds, cursor = [], [], 0
    for _, start, p, a, b in sorted(units, key=lambda u: u[1]):
        if start > cursor:
            sizes.append(start - cursor)
            kinds.append(None)
        sizes.append(p + a)
        kinds.append((p, a, b))
        if b:
            sizes.append(b)
            kinds.append("second")
        cursor = start + p + a + b
    if cursor < width:
        sizes.append(width - cursor)
        kinds.append(None)
    return sizes, kinds


def _row_attention(q, k, v, units, dropout, scaling) -> torch.Tensor:
    """One row (H, L, D) and its units: causal SDPA per [prompt + first] run, the rejected branch's rule per
    [second] run."""
    sizes, kinds = _row_runs(units, q.shape[1])
    # Split once into unit-sized pieces (rows, then [prompt + first] and [second] runs): the backward of a
    # split is one concatenation, where slicing the full tensor per unit would zero-fill a full-size
    # gradient per slice (quadratic in the number of units).
    qs, ks, vs = (t.split(sizes, dim=1) for t in (q, k, v))
    pieces = []
    for i, kind in enumerate(kinds):
        if kind is None:  # padding: nothing reads its outputs
            pieces.append(qs[i].new_zeros(q.shape[0], sizes[i], q.shape[2]))
        elif kind == "second":  # rejected branch: keys = prompt + rejected, causal aligned to the bottom right
            p = kinds[i - 1][0]
            branch = (qs[i], ks[i], vs[i], ks[i - 1][:, :p], vs[i - 1][:, :p])
            pieces.append(rejected_branch_sdpa(*(t[None] for t in branch), dropout, scaling)[0])
        else:
            pieces.append(
                F.scaled_dot_product_attention(
                    qs[i][None], ks[i][None], vs[i][None], dropout_p=dropout, is_causal=True, scale=scaling
                )[0]
            )
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]


def allowed(segment_ids: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The attention rule as a dense boolean (R, 1, L, L) tensor, True = attend."""
    width = segment_ids.shape[1]
    idx = torch.arange(width, device=segment_ids.device)
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    br_q, br_k = branch[:, :, None], branch[:, None, :]
    causal = idx[None, :, None] >= idx[None, None, :]
    same = (seg_q == seg_k) & (seg_q >= 0) & causal & ((br_k == 0) | (br_k == br_q))
    same |= torch.eye(width, dtype=torch.bool, device=segment_ids.device)[None]  # padding sees itself
    return same[:, None]


def flex_block_mask(segment_ids: torch.Tensor, branch: torch.Tensor):
    """The attention rule as a FlexAttention BlockMask over (R, L) rows (its mask_mod equals `allowed`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg, br = segment_ids, branch.long()

    def mask_mod(b, h, q, k):
        return ((seg[b, q] == seg[b, k]) & (seg[b, q] >= 0) & (k <= q) & ((br[b, k] == 0) | (br[b, k] == br[b, q]))) | (
            q == k
        )

    n, width = seg.shape
    return create_block_mask(mask_mod, B=n, H=None, Q_LEN=width, KV_LEN=width, device=seg.device)


# speed.attention values -> transformers attention implementations
IMPLEMENTATIONS = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}


def auto_attention(cuda: bool, flash_attn: bool, dtype: torch.dtype | None) -> str:
    """`speed.attention: auto` -> "sdpa" or "flash" (docs/performance.md, "Which attention").

    cuda: a CUDA device is available; flash_attn: the flash-attn package imports; dtype: the compute
    dtype (bf16/fp16 with model.dtype or train.mixed_precision, None when unknown before loading).
    flash needs all three (flash-attn has CUDA half-precision kernels only); everything else is
    per-unit sdpa, the one backend that trains everywhere and keeps prefix sharing. flex is never
    chosen automatically: it needs torch.compile, has no backward on CPU (torch 2.13), and its
    training path has not been run on a GPU here.
    """
    if cuda and flash_attn and dtype in (torch.bfloat16, torch.float16):
        return "flash"
    return "sdpa"


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def fast_attention(attention: str, attn_implementation: str | None, dtype: torch.dtype | None) -> str:
    """The attention implementation the fast path runs: `model.attn_implementation` when the user set it,
    else `speed.attention` (auto: `auto_attention` of this machine)."""
    if attn_implementation:
        return attn_implementation
    cuda, flash_attn = torch.cuda.is_available(), flash_attn_importable()
    choice = auto_attention(cuda, flash_attn, dtype) if attention == "auto" else attention
    if choice == "flash" and not (cuda and flash_attn):
        raise ValueError(
            "speed.attention=flash needs a CUDA device and the flash-attn package; use speed.attention=sdpa (or auto)"
        )
    return IMPLEMENTATIONS[choice]


def flex_on_cpu_problem(attention: str, attn_implementation: str | None, cuda: bool) -> str | None:
    """Why a training run cannot use FlexAttention here, or None: torch (2.13) has no FlexAttention backward on
    CPU, so such a run died in its first backward with a torch traceback (the forward alone works)."""
    asked = attn_implementation == "flex_attention" or (not attn_implementation and attention == "flex")
    if cuda or not asked:
        return None
    key = "model.attn_implementation=flex_attention" if attn_implementation else "speed.attention=flex"
    return (
        f"{key}: FlexAttention has no backward on CPU (torch), so it cannot train here; use sdpa "
        "(speed.attention=sdpa or auto, model.attn_implementation unset or sdpa), or a GPU"
    )


def is_flash(attn_implementation: str | None) -> bool:
    name = attn_implementation or ""
    return "flash" in name or "/" in name  # flash_attention_2/3/4 and hub kernels (e.g. kernels-community/flash-attn)


def supports_prefix_sharing(attn_implementation: str | None) -> bool:
    """Varlen flash kernels take contiguous causal segments only; the rejected branch is not one."""
    return not is_flash(attn_implementation)


def attention_inputs(config, batch: dict, dtype: torch.dtype, implementation: str | None = None) -> dict:
    """Model kwargs for a collate_packed batch: input_ids, position_ids, attention_mask (+ dpokit_units).

    implementation: the backend the batch was laid out for (`fast_attention`). A model on the default
    sdpa is switched to it, once and for good (a layer recomputed under gradient checkpointing looks its
    attention function up again, so the switch cannot be undone after the forward); any other
    configured backend is the user's choice and is kept. sdpa itself is switched to dpokit_sdpa
    (identical to sdpa for every call that carries no `dpokit_units`, e.g. generation).
    """
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if implementation and implementation != "sdpa" and impl in ("sdpa", ATTENTION_NAME):
        config._attn_implementation = impl = implementation
    input_ids, position_ids = batch["input_ids"], batch["position_ids"]
    segment_ids, branch = batch["segment_ids"], batch["branch"]
    if is_flash(impl):
        if bool((branch != 0).any()):
            raise ValueError(f"prefix sharing needs a mask that {impl} cannot take; set speed.prefix_sharing=false")
        # one row: flat positions (row * L + column) are unchanged, so the scored-token indices stay valid
        return {
            "input_ids": input_ids.reshape(1, -1),
            "position_ids": position_ids.reshape(1, -1),
            "attention_mask": None,
        }
    if impl == "sdpa":
        register()
        config._attn_implementation = ATTENTION_NAME
        impl = ATTENTION_NAME
    if impl == ATTENTION_NAME:
        units = tuple(tuple(u) for u in batch["units"].tolist())
        # The units say everything; a 4D placeholder (transformers passes 4D masks through untouched) saves
        # building a dense (rows, width, width) mask that segment_sdpa_forward would never read.
        placeholder = torch.ones((input_ids.shape[0], 1, 1, 1), dtype=torch.bool, device=input_ids.device)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": placeholder,
            "dpokit_units": units,
        }
    if impl == "flex_attention":
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": flex_block_mask(segment_ids, branch),
        }
    mask = allowed(segment_ids, branch)
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": additive}
