"""Sequence-tiled MLP (`speed.tiled_mlp`): the decoder layers' MLP run over chunks of tokens.

A dense MLP is position-wise, so its output for a token depends on that token alone. Run over the
whole sequence, its intermediate (tokens x intermediate_size, 4864 wide on a Qwen2.5-0.5B layer, and
three or four such tensors kept for backward) is the largest activation of a decoder layer on long
rows. `TiledMLP` runs the MLP chunk by chunk without keeping anything but its input; its backward
recomputes each chunk with gradients and returns the input's and the parameters' gradients, so the
wide intermediate exists for one chunk of tokens at a time, in forward and in backward. The price is
one more forward of the MLP per step (a recomputation, like gradient checkpointing's).

The parameters are inputs of the autograd function, so their gradients reach autograd like any
other (accumulated once per backward: DDP's and LoRA's hooks see one gradient). Autocast and the
random-number state (LoRA dropout) of the forward are restored for the recomputation, as
torch.utils.checkpoint does. Mixture-of-experts blocks are not position-wise in their outputs'
structure (a router) and are left alone; so is a sequence no longer than one chunk.
"""

from __future__ import annotations

import torch

from dpokit.config import ConfigError

_DENSE = (("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"), ("fc1", "fc2"), ("c_fc", "c_proj"))


class TiledMLP(torch.autograd.Function):
    """y = forward(x) over chunks of `chunk` tokens of x (..., H); only x is kept for backward."""

    @staticmethod
    def forward(ctx, forward, chunk: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        ctx.forward, ctx.chunk, ctx.n_params = forward, chunk, len(params)
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device), device)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x, *params)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([forward(piece) for piece in flat.split(chunk)])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        wanted = [p for p in params if p.requires_grad]
        flat, grads = x.reshape(-1, x.shape[-1]).detach(), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        grad_params = [None] * len(wanted)
        enabled, dtype, device = ctx.autocast
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            start = 0
            for piece, grad in zip(flat.split(ctx.chunk), grads.split(ctx.chunk)):
                piece = piece.requires_grad_(grad_x is not None)
                with torch.autocast(device, dtype=dtype, enabled=enabled):
                    out = ctx.forward(piece)
                inputs = ([piece] if grad_x is not None else []) + wanted
                got = torch.autograd.grad(out, inputs, grad, allow_unused=True) if inputs else ()
                if grad_x is not None:
                    grad_x[start : start + piece.shape[0]] = got[0]
                    got = got[1:]
                grad_params = [
                    g if acc is None else (acc if g is None else acc.add_(g)) for acc, g in zip(grad_params, got)
                ]
                start += piece.shape[0]
        by_param = iter(grad_params)
        param_grads = [next(by_param) if p.requires_grad else None for p in params]
        return (None, None, None if grad_x is None else grad_x.reshape(x.shape), *param_grads)


def tiled_call(forward, x: torch.Tensor, chunk: int, params) -> torch.Tensor:
    """forward(x), tiled over `chunk` tokens when x is longer than one chunk."""
    tokens = x.numel() // x.shape[-1]
    if tokens <= chunk:
        return forward(x)
    if not torch.is_grad_enabled():  # reference, precompute, evaluation: chunks, nothing to keep
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat([forward(piece) for piece in flat.split(chunk)])
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return TiledMLP.apply(forward, chunk, x, *[p for p in params if p.requires_grad])


_CLASSES: dict[type, type] = {}


def _tiled_class(base: type) -> type:
    """A subclass of the MLP's class whose forward is tiled (a class, not a patched instance attribute, so a deep
    copy of the model, e.g. a live reference, runs its own weights)."""
    if base not in _CLASSES:

        def forward(self, x):
            return tiled_call(super(cls, self).forward, x, self._dpokit_tile_tokens, self.parameters())

        cls = type(f"Tiled{base.__name__}", (base,), {"forward": forward, "_dpokit_base": base})
        _CLASSES[base] = cls
    return _CLASSES[base]


def dense_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The position-wise MLPs of the decoder layers: modules named `mlp` with dense projections and no experts."""
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp" or hasattr(module, "experts") or hasattr(module, "router"):
            continue
        if any(all(isinstance(getattr(module, a, None), torch.nn.Module) for a in names) for names in _DENSE):
            found.append(module)
    return found


def tile_mlps(model: torch.nn.Module, chunk: int) -> int:
    """Make every dense decoder MLP of `model` run over `chunk`-token tiles (0: off); returns how many there are."""
    if chunk < 0:
        raise ConfigError(f"config key 'speed.tiled_mlp' must be >= 0 (tokens per MLP tile, 0 = off), got {chunk}")
    if chunk == 0:
        return 0
    mlps = dense_mlps(model)
    for mlp in mlps:
        if not hasattr(type(mlp), "_dpokit_base"):
            mlp.__class__ = _tiled_class(type(mlp))
        mlp._dpokit_tile_tokens = chunk
    return len(mlps)


def untile_mlps(model: torch.nn.Module) -> None:
    """Undo tile_mlps."""
    for module in model.modules():
        base = getattr(type(module), "_dpokit_base", None)
        if base is not None:
            module.__class__ = base
