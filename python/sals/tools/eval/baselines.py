"""Baselines of the eval, as an attention function over the model's own dense cache (exact
post-RoPE keys and values; torch, for the eval only):

- ``streaming`` (StreamingLLM, Xiao et al. 2023): each decode step attends exactly over the
  first ``n_sink`` tokens and the last ``n_recent`` ones, on every layer. The other tokens are
  never read, so a StreamingLLM cache would hold only the window: its memory is counted as
  ``min(S, n_sink + n_recent) * 2 * Dk * 2`` bytes per full-attention layer.
- ``oracle``: the selection upper bound at a SALS setting's budget: sinks, recent window and
  the ``ceil(budget_frac * S)`` candidates with the largest exact attention probability summed
  over all query heads (one selection per layer shared by every head, as SALS selects), exact
  keys and values; SALS's dense layers stay dense. The gap dense -> oracle is the cost of
  sparsity itself; oracle -> SALS is the cost of latent scoring, rebuilt keys and quantised
  values.

Prefill (more than one query) and sliding-window layers use SDPA unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import torch

NAME = "sals_eval_select"


@dataclasses.dataclass
class Policy:
    """Which tokens a decode step on a full-attention layer keeps."""

    kind: str                  # "streaming" or "oracle"
    layers: frozenset          # full-attention layers it applies to (others: SDPA)
    n_sink: int
    n_recent: int
    budget_frac: float = 0.125
    budget_tokens: int = 0

    def budget(self, S: int) -> int:
        n = self.budget_tokens if self.budget_tokens > 0 else math.ceil(self.budget_frac * S)
        return max(0, min(n, S - self.n_sink - self.n_recent))


_policy: Policy | None = None


def _select_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    policy = _policy
    if policy is None or query.shape[2] != 1 or module.layer_idx not in policy.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("the eval's baselines run one sequence at a time")
    _, hq, _, d = query.shape
    hkv, S = key.shape[1], key.shape[2]
    g = hq // hkv
    scale = scaling if scaling is not None else d ** -0.5
    q = query[0, :, 0].float().view(hkv, g, d)
    k, v = key[0].float(), value[0].float()
    logits = torch.einsum("hgd,hsd->hgs", q, k) * scale            # [Hkv, G, S]
    keep = torch.zeros(S, dtype=torch.bool, device=query.device)
    keep[:min(S, policy.n_sink)] = True
    keep[max(0, S - policy.n_recent):] = True
    if policy.kind == "oracle":
        n = policy.budget(S)
        if n > 0:
            mass = logits.softmax(-1).sum((0, 1))                   # [S]
            mass[keep] = -1.0
            keep[mass.topk(n).indices] = True
    elif policy.kind != "streaming":
        raise ValueError(policy.kind)
    logits = logits.masked_fill(~keep, float("-inf"))
    out = torch.einsum("hgs,hsd->hgd", logits.softmax(-1), v)      # [Hkv, G, d]
    return out.reshape(1, 1, hq, d).to(query.dtype), None


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _select_attention)
    # without a mask function of the same name the model would get no mask at all
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


class selecting:
    """Context manager: decode steps of ``model`` follow ``policy`` (prefill unchanged)."""

    def __init__(self, model, policy: Policy):
        self.model, self.policy = model, policy

    def __enter__(self):
        global _policy
        _register()
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)
        _policy = self.policy
        return self

    def __exit__(self, *exc):
        global _policy
        _policy = None
        self.model.set_attn_implementation(self.previous)
