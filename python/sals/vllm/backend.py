"""The SALS attention backend for vLLM (CPU): each layer's tokens live compressed in vLLM's
paged KV memory, one slot per token (sals.PagedLayer, ``sals_paged_*``).

Per layer and forward step (vLLM passes post-RoPE q and k, and v, for the step's tokens of
every scheduled request, packed):
  - the keys are turned back to pre-RoPE (the inverse rotation at each token's position), scaled
    by the calibration's key scale if it has one, and stored with their values into the
    slots vLLM's slot mapping names (latent key, quantised value); the tokens that fall in a
    sequence's sinks or recent window are also copied exactly into the layer's window store
    (_windows: rows handed out once per step for all layers);
  - a request's first prefill chunk (nothing stored before it) attends exactly: causal SDPA
    over the step's own post-RoPE keys and values, as a dense model would;
  - every other request (decode steps, later chunks of a chunked prefill, prompts continuing a
    prefix-cache hit) attends through sals: one query takes a SALS step (select in the latent
    space, rebuild the selected keys), several attend every stored token rebuilt, causally.
Prefix caching and preemption need nothing more: a slot is a function of its token's key and
value alone, so shared blocks hold what a recomputation would write, a preempted request is
recomputed into the blocks vLLM gives it again, and the window store's rows follow the slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.registry import register_backend
from vllm.v1.kv_cache_interface import AttentionSpec

from .. import PagedLayer, Rope, UnsupportedError, rope_apply
from . import _plan
from ._windows import WindowRows


# vLLM's attention layers look their backend up by name among the registered ones: the name
# is registered where the class is first imported, in each process that builds layers.
@register_backend("SALS")
class SalsAttentionBackend(AttentionBackend):
    """vLLM's view of the backend: a smaller per-token slot, the impl, the metadata."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.float16,
                                                     torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "SALS"

    @staticmethod
    def get_impl_cls() -> type["SalsAttentionImpl"]:
        return SalsAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SalsMetadataBuilder"]:
        return SalsMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One slot per token (num_head_slots 1) of the plan's slot_bytes, rounded up to whole
        elements of the cache dtype: this is what makes vLLM fit more tokens."""
        plan = _plan.current()
        return dataclasses.replace(spec, num_head_slots=1, state_content_bytes=(
            _plan.padded_slot_bytes(plan.slot_bytes, spec.dtype)))

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class SalsMetadata:
    """One step's batch, shared by every layer. Index tensors are int32 on the CPU."""

    num_actual_tokens: int
    query_start: torch.Tensor    # [B + 1]
    seq_lens: torch.Tensor       # [B]
    block_table: torch.Tensor    # [B, max_blocks]
    slot_mapping: torch.Tensor   # [num_actual_tokens]
    positions: torch.Tensor      # [num_actual_tokens]: each token's position in its request
    # The requests in order, grouped: ("exact", b, b + 1) for a first prefill chunk, ("sals",
    # b0, b1) for a run of requests attending through sals.
    runs: list
    # Window store rows (None when no exact copies are kept): of each appended token [N], and
    # of each request's sinks and recent tokens [B, n_sink + n_recent].
    append_rows: torch.Tensor | None
    window_rows: torch.Tensor | None


class SalsMetadataBuilder(AttentionMetadataBuilder[SalsMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        plan = _plan.activate(vllm_config)
        cfg = plan.configs[0]  # every layer has the same windows
        self.windows = (WindowRows(plan.window_capacity, cfg.n_sink, cfg.n_recent)
                        if plan.window_capacity > 0 and cfg.n_sink + cfg.n_recent > 0 else None)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SalsMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise UnsupportedError("attention: the SALS backend attends causally only")
        n = m.num_actual_tokens
        query_start = m.query_start_loc_cpu[:m.num_reqs + 1].to(torch.int32)
        seq_lens = m.seq_lens[:m.num_reqs].to("cpu", torch.int32)
        q_lens = query_start[1:] - query_start[:-1]
        # token t of request b is at position seq_len_b - q_len_b + (t - query_start_b)
        first = seq_lens - q_lens - query_start[:-1]
        positions = (torch.repeat_interleave(first, q_lens, output_size=n)
                     + torch.arange(n, dtype=torch.int32))
        runs = []
        for b, (s, q) in enumerate(zip(seq_lens.tolist(), q_lens.tolist())):
            kind = "exact" if s == q else "sals"
            if kind == "sals" and runs and runs[-1][0] == "sals":
                runs[-1] = ("sals", runs[-1][1], b + 1)
            else:
                runs.append((kind, b, b + 1))
        block_table = m.block_table_tensor[:m.num_reqs].to("cpu", torch.int32)
        slot_mapping = m.slot_mapping[:n].to("cpu", torch.int32)
        append_rows = window_rows = None
        if self.windows is not None:
            rows = self.windows.step(query_start.numpy(), seq_lens.numpy(), block_table.numpy(),
                                     slot_mapping.numpy(), self.kv_cache_spec.block_size)
            append_rows, window_rows = (torch.from_numpy(r) for r in rows)
        return SalsMetadata(
            num_actual_tokens=n, query_start=query_start.contiguous(), seq_lens=seq_lens,
            block_table=block_table, slot_mapping=slot_mapping, positions=positions, runs=runs,
            append_rows=append_rows, window_rows=window_rows)


class SalsAttentionImpl(AttentionImpl[SalsMetadata]):
    """One attention layer. Its sals.PagedLayer is made on the first forward, which names the
    layer (vLLM builds the impl without its name)."""

    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes: list[float] | None = None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None, **kwargs):
        refused = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                   "logits_soft_cap": logits_soft_cap, "sinks": sinks,
                   "kv_sharing_target_layer_name": kv_sharing_target_layer_name}
        for name, value in refused.items():
            if value is not None:
                raise UnsupportedError(f"attention: {name} is not supported by the SALS backend "
                                       f"(got {value!r})")
        if attn_type != AttentionType.DECODER:
            raise UnsupportedError(f"attention: {attn_type} attention is not supported by the "
                                   f"SALS backend (decoder only)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype  # read by vLLM (kv_quant_mode)
        self.plan = _plan.activate(get_current_vllm_config())
        self.paged: PagedLayer | None = None
        self.key_scale: torch.Tensor | None = None
        self.window: torch.Tensor | None = None  # [window_capacity, 2, Hkv, d] exact copies
        rope = self.plan.rope
        # The inverse rotation: -theta, and 1/attention_scaling for the scaled cos and sin.
        self.unrope = Rope(-rope.inv_freq, attention_scaling=1.0 / rope.attention_scaling)

    def _layer(self, layer) -> PagedLayer:
        if self.paged is None:
            index = extract_layer_index(layer.layer_name)
            cfg = dataclasses.replace(self.plan.configs[index], scale=self.scale)
            self.paged = PagedLayer(cfg, self.plan.rope, self.plan.projections[index])
            self.key_scale = _plan.key_scale_tensor(self.plan.key_scales[index], self.head_size)
            if self.plan.window_capacity > 0 and cfg.n_sink + cfg.n_recent > 0:
                self.window = torch.zeros(
                    (self.plan.window_capacity, 2, self.num_kv_heads, self.head_size),
                    dtype=getattr(torch, cfg.dtype))
        return self.paged

    def _pre_rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rope_apply(x, positions, self.unrope)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: SalsMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, Hq, d], key and value [T, Hkv, d] (post-RoPE q and k), kv_cache this
        layer's pages [num_blocks, 1, block_size, slot elements]; writes output [T, Hq, d]."""
        if output_scale is not None or output_block_scale is not None:
            raise UnsupportedError("attention: fused output quantization is not supported by "
                                   "the SALS backend")
        if attn_metadata is None:  # profiling and warm-up runs: no cache yet
            return output
        paged = self._layer(layer)
        m = attn_metadata
        n = m.num_actual_tokens
        pages = kv_cache.view(torch.uint8)[:, 0, :, :paged.slot_bytes]
        k = self._pre_rope(key[:n], m.positions)
        if self.key_scale is not None:
            k = k * self.key_scale.to(k.dtype)
        window = self.window if m.window_rows is not None else None
        paged.append(k, value[:n], m.slot_mapping, pages, m.append_rows, window)
        qs = m.query_start.tolist()
        q_pre = None
        for kind, b0, b1 in m.runs:
            s, e = qs[b0], qs[b1]
            if kind == "exact":
                # nothing stored before this chunk: the exact keys of the step, as vLLM's own
                out = F.scaled_dot_product_attention(
                    query[s:e].transpose(0, 1), key[s:e].transpose(0, 1),
                    value[s:e].transpose(0, 1), is_causal=True, scale=self.scale,
                    enable_gqa=True)
                output[s:e] = out.transpose(0, 1)
                continue
            if q_pre is None:
                q_pre = self._pre_rope(query[:n], m.positions)
                if self.key_scale is not None:  # logits unchanged: q / s against s * k
                    q_pre = q_pre / self.key_scale.repeat_interleave(
                        self.num_heads // self.num_kv_heads, 0).to(q_pre.dtype)
            paged.attend(q_pre[s:e], m.query_start[b0:b1 + 1] - s, m.seq_lens[b0:b1],
                         m.block_table[b0:b1], pages,
                         None if window is None else m.window_rows[b0:b1], window,
                         out=output[s:e])
        return output
