"""Work the SVD UNet need not redo: installed on a loaded pipeline by `pipeline.py`, reset for every pipeline call.

1. One-token cross-attention (always on, exact). SVD's cross-attention attends to a single CLIP image token, so
   the softmax over it is 1 at every position and step: the output is `to_out(to_v(context))`, broadcast. The
   query and key projections and the attention itself are skipped; the result equals the full computation up to
   float rounding.
2. Deep-feature reuse (`cache_interval` N > 1), after DeepCache (Ma, Fang and Wang, CVPR 2024): the deep part of
   a UNet changes slowly from one denoising step to the next. Every N-th step runs the whole UNet and keeps the
   output of the second-to-last up block; the steps between run only the shallowest down block and the last up
   block, on that kept feature and fresh shallow skip connections. Step 0 of every call always runs in full, and
   `reset` clears what was kept, so nothing of one request reaches the next.

Written for diffusers' `UNetSpatioTemporalConditionModel`: its forward loops over `down_blocks`, `mid_block` and
`up_blocks`; the skipped blocks answer with zero-cost placeholders of the right shapes (nothing reads them).
"""

from __future__ import annotations

from typing import Any

import torch


class OneTokenCrossAttention:
    """An attention processor for cross-attention over one context token; anything else goes to `fallback`."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if (encoder_hidden_states is None or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[1] != 1
                or attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None
                or hidden_states.ndim != 3):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        # softmax over a single key is 1 whatever the query: every position receives that key's value.
        out = attn.to_out[1](attn.to_out[0](attn.to_v(context)))
        out = out.to(hidden_states.dtype).expand(-1, hidden_states.shape[1], -1)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_cross_attention(unet) -> int:
    """Put OneTokenCrossAttention on every cross-attention of `unet`; returns how many."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention \
                and not isinstance(module.processor, OneTokenCrossAttention):
            module.set_processor(OneTokenCrossAttention(module.processor))
            count += 1
    return count


def _meta(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tensor.device


def _placeholder(meta: tuple) -> torch.Tensor:
    """A tensor of the recorded shape, dtype and device that costs nothing (a broadcast zero)."""
    shape, dtype, device = meta
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


class DeepCache:
    """Deep-feature reuse on one UNet. `reset(interval)` before each pipeline call; the UNet's own forward does
    the rest, one tick per call (one denoising step, both guidance halves in one batch)."""

    def __init__(self, unet):
        self.unet = unet
        self.interval = 1
        self.calls = 0  # UNet forward calls since the last reset
        self.skipping = False  # this call reuses the kept deep feature
        self._kept: torch.Tensor | None = None  # the second-to-last up block's output at the last full step
        self._shapes: dict[int, Any] = {}  # shape, dtype, device of the skipped blocks' outputs at the last full step
        self.full_steps = 0
        self.cached_steps = 0
        down, up = unet.down_blocks, unet.up_blocks
        if len(down) < 2 or len(up) < 2:
            raise ValueError("deep-feature reuse needs at least two down and two up blocks")
        self._wrap(down[0], self._shallow_down)
        for block in list(down[1:]) + [unet.mid_block] + list(up[:-1]):
            self._wrap(block, self._deep)

    def reset(self, interval: int) -> None:
        """A new pipeline call: forget the kept feature and count steps from 0."""
        self.interval, self.calls, self.skipping, self._kept = max(1, int(interval)), 0, False, None
        self._shapes.clear()

    @staticmethod
    def _wrap(block, hook) -> None:
        original = block.forward

        def forward(*args, **kwargs):
            return hook(block, original, *args, **kwargs)

        block.forward = forward  # an instance attribute: nn.Module.__call__ finds it first

    def _shallow_down(self, block, original, *args, **kwargs):
        """The first block of every UNet call: decide whether this step runs in full."""
        self.skipping = self.interval > 1 and self._kept is not None and self.calls % self.interval != 0
        self.calls += 1
        if self.skipping:
            self.cached_steps += 1
        else:
            self.full_steps += 1
        return original(*args, **kwargs)

    def _deep(self, block, original, *args, **kwargs):
        key = id(block)
        if self.skipping:
            if block is self.unet.up_blocks[-2]:
                return self._kept
            meta = self._shapes[key]
            if isinstance(meta[1], tuple):  # a down block: (sample, res_samples)
                sample, res = meta
                return _placeholder(sample), tuple(_placeholder(r) for r in res)
            return _placeholder(meta)
        out = original(*args, **kwargs)
        if self.interval > 1:
            if block is self.unet.up_blocks[-2]:
                self._kept = out
            self._shapes[key] = ((_meta(out[0]), tuple(_meta(r) for r in out[1])) if isinstance(out, tuple)
                                 else _meta(out))
        return out
