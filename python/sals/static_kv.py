"""Exact keys and values in static tensors, attended with ``scaled_dot_product_attention``: the
dense layers of ``sals.hf.patch(..., dense_kv="exact")`` (``sals.hf.ExactLayer``) and every
layer of the dense-graph baseline (``sals.tools.graph_decoder.DenseGraphDecoder``). Needs torch.

A :class:`StaticKV` holds one attention layer's post-RoPE keys and values,
``[max_batch, n_head_kv, max_tokens, head_dim]`` each in the model's dtype, allocated once.
Writes go to slots named by a device tensor and a decode step attends over a fixed number of
slots under a boolean mask, so a step has fixed shapes and reads no host value: a CUDA graph
replays it at whatever slot the tensor holds then, and ``torch.compile`` writes the tensors in
place (``index_copy_``, which inductor keeps in place, as GPT-Fast's static cache does).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

#: scaled_dot_product_attention takes enable_gqa (grouped-query heads without copying K/V)
#: from torch 2.5 on; older releases get each KV head repeated for its query heads
NATIVE_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[*positions.shape, 2 * len(inv_freq)]`` of rotate-half RoPE at integer
    ``positions``, computed as transformers' rotary modules compute them (float32 frequencies
    with any scaling folded into ``inv_freq``, times ``attention_scaling``, then rounded to
    ``dtype``), so that keys rotated here equal the model's own."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    emb = torch.cat((freqs, freqs), -1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., head_dim]`` (pairs i and i + head_dim/2) with cos and sin
    broadcastable to x, in the order transformers' ``apply_rotary_pos_emb`` computes it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor | None, scale: float, causal: bool = False) -> torch.Tensor:
    """``softmax(q kᵀ · scale)`` over the keys ``mask`` allows, times the values:
    ``q [B, Hq, T, d]``, ``keys, values [B, Hkv, S, d]`` with Hq a multiple of Hkv (query head
    i reads KV head ``i // (Hq / Hkv)``), ``mask`` bool broadcastable to ``[B, Hq, T, S]``,
    True where a query may attend, or None with ``causal`` (query t sees keys 0..t, T = S).
    Returns ``[B, Hq, T, d]`` in q's dtype."""
    grouped = q.shape[1] != keys.shape[1]
    if grouped and not NATIVE_GQA:
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    # enable_gqa rather than folding each KV head's query heads into query rows: with a mask,
    # cuDNN runs the former at the byte floor on an H100 and the latter at about 55%
    extra = {"enable_gqa": True} if grouped and NATIVE_GQA else {}
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                          scale=scale, **extra)


def choose_backend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor, scale: float) -> str:
    """The attention backend for inputs shaped like these (CUDA only; run eagerly, outside a
    graph capture): "cudnn" if cuDNN attention takes them (it reads keys and values only), else
    "default (cuDNN refused: <why>)", torch's own choice. cuDNN refuses float32 and some head
    sizes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            warnings.simplefilter("ignore")  # torch's list of why each backend refused
            attention(q, keys, values, mask, scale)
        return "cudnn"
    except RuntimeError as e:
        return f"default (cuDNN refused: {str(e).splitlines()[0]})"


def backend(name: str):
    """A context selecting the backend :func:`choose_backend` named (torch.compile traces it)."""
    if name == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    return contextlib.nullcontext()


class StaticKV:
    """One attention layer's exact post-RoPE keys and values for up to ``max_batch`` sequences of
    ``max_tokens`` slots: ``keys`` and ``values``, ``[max_batch, n_head_kv, max_tokens,
    head_dim]`` of ``dtype`` on ``device``, zero at creation. A slot holds one token of one
    sequence; which slots hold tokens is the caller's business (it passes the mask)."""

    def __init__(self, max_batch: int, n_head_kv: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (max_batch, n_head_kv, max_tokens, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, rows: slice, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``[b, n_head_kv, T, head_dim]`` (post-RoPE keys) into sequences
        ``rows`` at ``slots`` (``[T]`` int64 on the tensors' device: a device index, so a graph
        replays the write at whatever slots it holds then)."""
        self.keys[rows].index_copy_(2, slots, k)
        self.values[rows].index_copy_(2, slots, v)

    def attend(self, rows: slice, q: torch.Tensor, mask: torch.Tensor, scale: float,
               window: int | None = None) -> torch.Tensor:
        """:func:`attention` of ``q [b, Hq, T, head_dim]`` (post-RoPE) over slots
        ``0..window-1`` of sequences ``rows`` (None: all ``max_tokens``); ``mask``
        broadcastable to ``[b, Hq, T, window]``."""
        return attention(q, self.keys[rows, :, :window], self.values[rows, :, :window], mask,
                         scale)
