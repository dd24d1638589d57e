"""GPT-Fast-class greedy decode loops of an HF Llama / Mistral / Qwen2 model, the harness of
``python -m sals bench e2e``'s ``*-graph`` rows: ``DenseGraphDecoder``, the strong dense
baseline (``dense-graph``), and ``SalsGraphDecoder``, the same loop over a patched model's
``SalsCache`` (``sals-25-graph``, ``sals-12.5-graph``).

    dec = DenseGraphDecoder(model, max_batch=8, max_tokens=4096 + 48)
    logits = dec.prefill(ids)          # [B, S] prompt ids -> [B, V] logits of the last token
    for _ in range(47):
        logits = dec.step()            # one token per sequence; dec.token is the greedy choice

Both run the model's own weights without transformers' forward: per layer RMSNorm -> one fused
QKV projection -> attention -> o_proj, residual, RMSNorm, one fused gate/up projection, SiLU,
down_proj; then the final norm, lm_head and argmax. The attention is the only difference: RoPE
at the step's position, the step's K/V written into static per-layer tensors and
scaled_dot_product_attention over them (cuDNN on CUDA) for the dense decoder; the pre-RoPE
query, key and value handed to the SALS layer (which stores, selects, rebuilds, rotates and
attends) for the SALS one. On CUDA the decode step is one CUDA graph, replayed every step; on
the CPU it runs eagerly.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from .. import static_kv
from ..errors import InvalidArgumentError, UnsupportedError

#: model_type of the decoder-only families whose layers this decoder reproduces exactly
SUPPORTED = ("llama", "mistral", "qwen2")

#: rotary types whose frequencies change with the sequence length (one fixed table is wrong)
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclasses.dataclass
class _Layer:
    """One decoder layer's weights: the model's own tensors, except the two fused copies."""

    norm1: torch.Tensor
    eps1: float
    qkv: torch.Tensor             # fused copy: [q_proj; k_proj; v_proj] rows
    qkv_bias: torch.Tensor | None  # fused copy of the three biases (Qwen2), or None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor         # fused copy: [gate_proj; up_proj] rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _cat_bias(*linears) -> torch.Tensor | None:
    # the families here give all or none of the fused projections a bias (Qwen2: q, k, v)
    return None if linears[0].bias is None else torch.cat([m.bias for m in linears])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as the HF RMSNorm: normalise in float32, round to the model dtype, then scale
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def check_model(model, max_tokens: int):
    """The model's decoder, or InvalidArgumentError naming what this decoder cannot run."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise InvalidArgumentError(
            f"model: {type(model).__name__} (model_type {model_type!r}) is not supported by "
            f"DenseGraphDecoder; supported: HF causal LMs of model_type {', '.join(SUPPORTED)}")
    decoder = getattr(model, "model", None)
    if not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(model, "lm_head"):
        raise InvalidArgumentError(
            f"model: {type(model).__name__} has no model.embed_tokens/layers/norm/rotary_emb "
            f"and lm_head; DenseGraphDecoder takes a ...ForCausalLM of {', '.join(SUPPORTED)}")
    if config.hidden_act != "silu":
        raise InvalidArgumentError(
            f"model: hidden_act {config.hidden_act!r}; DenseGraphDecoder implements the SwiGLU "
            f"MLP (silu) only")
    rope_type = str(getattr(decoder.rotary_emb, "rope_type", "default"))
    if any(kind in rope_type for kind in _DYNAMIC_ROPE):
        raise InvalidArgumentError(
            f"model: rope_type {rope_type!r} changes frequencies with the sequence length; "
            f"DenseGraphDecoder needs fixed frequencies (default, linear, llama3, yarn)")
    # a sliding window no shorter than max_tokens never masks anything: full attention
    window = getattr(config, "sliding_window", None)
    sliding = model_type == "mistral" or "sliding_attention" in (
        getattr(config, "layer_types", None) or [])
    if sliding and window is not None and window < max_tokens:
        raise InvalidArgumentError(
            f"max_tokens: {max_tokens} passes the model's sliding window ({window}); "
            f"DenseGraphDecoder implements full attention only")
    dtype = model.lm_head.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InvalidArgumentError(
            f"model: weights are {dtype}; DenseGraphDecoder takes float32, float16 or bfloat16")
    return decoder


def fused_weight_bytes(model) -> int:
    """Bytes of the fused copies a DenseGraphDecoder of ``model`` holds beside the model's own
    weights: each layer's [q; k; v] and [gate; up] projections, biases included."""
    total = 0
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for linear in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            for t in (linear.weight, linear.bias):
                total += 0 if t is None else t.numel() * t.element_size()
    return total


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name}: expected a positive int, got {value!r}")
    return value


class DenseGraphDecoder:
    """Greedy dense decode of ``model`` (an HF LlamaForCausalLM, MistralForCausalLM or
    Qwen2ForCausalLM on the CPU or one CUDA device) for up to ``max_batch`` sequences of up to
    ``max_tokens`` tokens (prompt + generated).

    Memory, on top of the model: static K and V per layer, ``[max_batch, kv_heads, max_tokens,
    head_dim]`` in the model dtype (``cache_bytes``), and fused copies of every layer's
    q/k/v and gate/up weights (and biases), as GPT-Fast builds them: one GEMM each instead of
    three and two (``fused_bytes``: 57% of the weights' bytes for the Llama-3.1-8B shape, 67%
    for LLaMA2-7B's). The model is left as it is; the decoder reads its other weights in place.
    Then, on CUDA, the graph's private pool for the step's activations and ``[B, vocab]``
    logits.

    Prompts are prefilled one sequence at a time, so a prefill's activations are those of one
    prompt, not of the batch (the K/V cache, not the prompt, limits the batch). A decode step
    attends over all ``max_tokens`` cached positions with a mask of those not yet written
    (fixed shapes for the graph): it reads ``max_tokens`` keys and values per layer, not only
    those written so far.

    On CUDA the step selects cuDNN attention (``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``);
    where cuDNN refuses the inputs (float32, unsupported head size) torch's default choice runs
    instead; ``attention_backend`` says which. ``cuda_graph=False`` runs every step eagerly
    (the reference a graph replay is tested against); on the CPU steps are always eager.
    ``compile=True`` runs the decode step's forward through ``torch.compile`` (inductor, one
    graph, as GPT-Fast does: the norms, RoPE, SiLU and residual adds fused), compiled at the
    first step of each batch size (the eager warm-up on CUDA) and captured like the eager one.
    """

    def __init__(self, model, max_batch: int, max_tokens: int, cuda_graph: bool = True,
                 compile: bool = False):
        self.max_batch = _positive_int(max_batch, "max_batch")
        self.max_tokens = _positive_int(max_tokens, "max_tokens")
        decoder = check_model(model, self.max_tokens)
        config = model.config
        attn0 = decoder.layers[0].self_attn
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(config.num_key_value_heads)
        self.head_dim = int(attn0.head_dim)
        self.scaling = float(attn0.scaling)
        self.embed = decoder.embed_tokens.weight
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.norm, self.norm_eps = decoder.norm.weight, float(decoder.norm.variance_epsilon)
        self.lm_head = model.lm_head.weight
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in decoder.layers]
        self.fused_bytes = fused_weight_bytes(model)

        self.cache_bytes = self._make_cache(model)

        # RoPE for every position, as the model's rotary module computes it
        self.positions = torch.arange(self.max_tokens, device=self.device)
        rotary = decoder.rotary_emb
        self.cos, self.sin = static_kv.rope_cos_sin(
            self.positions, rotary.inv_freq.to(self.device), rotary.attention_scaling,
            self.dtype)

        # the step's static inputs: the token each sequence feeds next and the position it
        # takes (the same for every sequence: prompts have equal lengths); the step writes both
        self._token = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.batch = 0    # sequences of the current prefill
        self.length = 0   # tokens each sequence holds (host copy of _pos)
        self.attention_backend = "default" if self.device.type != "cuda" else None
        self._graph = None      # the captured step of the current batch size
        self._warm = False      # an eager step of this batch size ran (the capture's warm-up)
        self._graph_logits = None
        self.compile = bool(compile)
        if self.compile:
            from ..hf.graphs import compiled

            self._step_logits = functools.partial(compiled(type(self)._step_logits), self)

    def _make_cache(self, model) -> int:
        """Allocate the decoder's cache; returns its bytes."""
        self.kv = [static_kv.StaticKV(self.max_batch, self.n_kv, self.max_tokens, self.head_dim,
                                      self.dtype, self.device) for _ in self.layers]
        return sum(kv.nbytes for kv in self.kv)

    def _fuse(self, layer) -> _Layer:
        a, m = layer.self_attn, layer.mlp
        return _Layer(
            norm1=layer.input_layernorm.weight, eps1=float(layer.input_layernorm.variance_epsilon),
            qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            qkv_bias=_cat_bias(a.q_proj, a.k_proj, a.v_proj),
            o=a.o_proj.weight, o_bias=a.o_proj.bias,
            norm2=layer.post_attention_layernorm.weight,
            eps2=float(layer.post_attention_layernorm.variance_epsilon),
            gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
            gate_up_bias=_cat_bias(m.gate_proj, m.up_proj),
            down=m.down_proj.weight, down_bias=m.down_proj.bias)

    @property
    def token(self) -> torch.Tensor:
        """[B, 1] the greedy choice of the last logits: the next step's input (a static buffer
        on CUDA, overwritten by the next step)."""
        return self._token[:self.batch]

    def _forward(self, ids, attend) -> torch.Tensor:
        """Logits [b, V] of the last of ``ids`` [b, T]. ``attend(i, q, k, v)``: layer i's
        attention of the pre-RoPE q [b, T, H, D], k and v [b, T, Hkv, D] -> [b, T, H, D]."""
        b, t = ids.shape
        h = F.embedding(ids, self.embed)
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for i, w in enumerate(self.layers):
            x = _rms_norm(h, w.norm1, w.eps1)
            q, k, v = F.linear(x, w.qkv, w.qkv_bias).split((nq, nkv, nkv), -1)
            o = attend(i, q.view(b, t, self.n_heads, self.head_dim),
                       k.view(b, t, self.n_kv, self.head_dim), v.view(b, t, self.n_kv,
                                                                     self.head_dim))
            h = h + F.linear(o.reshape(b, t, nq), w.o, w.o_bias)
            x = _rms_norm(h, w.norm2, w.eps2)
            gate, up = F.linear(x, w.gate_up, w.gate_up_bias).chunk(2, -1)
            h = h + F.linear(F.silu(gate) * up, w.down, w.down_bias)
        return F.linear(_rms_norm(h[:, -1], self.norm, self.norm_eps), self.lm_head)

    def _store(self, i: int, rows: slice, pos, rope, q, k, v):
        """Rotate q and k [b, T, heads, D] by ``rope`` (the (cos, sin) of positions ``pos``
        [T], a device tensor) and write k and v into layer i's static K/V, rows ``rows``, slots
        ``pos`` (slot = position: a graph replays the write at whatever position _pos holds).
        Returns q, k and v as written, [b, heads, T, D], q and k rotated."""
        cos, sin = rope
        q = static_kv.rotate(q.transpose(1, 2), cos, sin)
        k = static_kv.rotate(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        self.kv[i].write(rows, pos, k, v)
        return q, k, v

    def _check_prompts(self, ids) -> tuple[int, int]:
        """(B, S) of prompts ``ids``, or InvalidArgumentError naming them."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (
                torch.int32, torch.int64):
            raise InvalidArgumentError(
                f"ids: expected a [batch, tokens] tensor of token ids, got "
                f"{getattr(ids, 'shape', type(ids).__name__)} {getattr(ids, 'dtype', '')}")
        b, s = ids.shape
        if not 1 <= b <= self.max_batch:
            raise InvalidArgumentError(
                f"ids: batch {b} is outside 1..max_batch ({self.max_batch})")
        if not 1 <= s < self.max_tokens:
            raise InvalidArgumentError(
                f"ids: {s} prompt tokens; need 1..{self.max_tokens - 1} (max_tokens "
                f"{self.max_tokens} leaves room for the generated tokens)")
        return b, s

    def _new_batch(self, b: int) -> None:
        if b != self.batch:  # the graph's shapes and static buffers are those of one batch
            self._graph, self._warm, self._graph_logits = None, False, None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Prefill prompts ``ids`` [B, S] (token ids of equal length, B <= max_batch,
        S < max_tokens), one sequence at a time; returns the logits [B, V] of each prompt's last
        token. Starts over: whatever an earlier prefill stored is dropped."""
        b, s = self._check_prompts(ids)
        self._new_batch(b)
        ids = ids.to(device=self.device, dtype=torch.long)
        pos = self.positions[:s]
        rope = self.cos[:s], self.sin[:s]

        def attend(r):  # the prompt of row r attends to itself: no cache read needed
            def run(i, q, k, v):
                q, k, v = self._store(i, slice(r, r + 1), pos, rope, q, k, v)
                return static_kv.attention(q, k, v, None, self.scaling,
                                           causal=True).transpose(1, 2)
            return run

        logits = torch.cat([self._forward(ids[r:r + 1], attend(r)) for r in range(b)])
        self.batch, self.length = b, s
        self._token[:b].copy_(logits.argmax(-1, keepdim=True))
        self._pos.fill_(s)
        return logits

    def _written(self) -> torch.Tensor:
        """[1, 1, 1, max_tokens] bool: the cache positions written, this step's included (the
        rest hold zeros or an earlier prompt's keys and are masked out)."""
        return (self.positions <= self._pos).view(1, 1, 1, -1)

    def _attend(self, b: int):
        """The attention of a decode step of rows 0..b-1 (for _forward): the step's K/V
        written at _pos, then the query over every cached position, those not yet written
        masked out."""
        rows, mask = slice(0, b), self._written()
        rope = self.cos.index_select(0, self._pos), self.sin.index_select(0, self._pos)

        def run(i, q, k, v):
            q = self._store(i, rows, self._pos, rope, q, k, v)[0]
            return self.kv[i].attend(rows, q, mask, self.scaling).transpose(1, 2)
        return run

    def _step_logits(self, b: int) -> torch.Tensor:
        """The logits [b, V] of a decode step of rows 0..b-1 (what ``compile`` compiles)."""
        with static_kv.backend(self.attention_backend):
            return self._forward(self._token[:b], self._attend(b))

    def _decode(self) -> torch.Tensor:
        """One decode step on the static inputs: reads _token and _pos, writes the step's K/V,
        the greedy token into _token and _pos + 1 into _pos. Returns the logits [B, V]."""
        b = self.batch
        logits = self._step_logits(b)
        self._token[:b].copy_(logits.argmax(-1, keepdim=True))
        self._pos.add_(1)
        return logits

    def _choose_backend(self) -> None:
        """cuDNN attention if it takes the step's inputs (tried on layer 0's cache, which it
        only reads), else torch's default choice, with cuDNN's reason in attention_backend."""
        b = self.batch
        q = torch.zeros(b, self.n_heads, 1, self.head_dim, dtype=self.dtype, device=self.device)
        kv = self.kv[0]
        self.attention_backend = static_kv.choose_backend(
            q, kv.keys[:b], kv.values[:b], self._written(), self.scaling)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One greedy decode step of every sequence: feeds ``token`` at the next position and
        returns the logits [B, V] (on CUDA with cuda_graph, the graph's static output,
        overwritten by the next step: clone it to keep it). ``token`` then holds their argmax.

        On CUDA the first step after a prefill of a new batch size runs eagerly (it warms up
        cuBLAS and cuDNN), the second is captured in a CUDA graph and replayed, and every later
        step replays that graph."""
        if self.batch == 0:
            raise InvalidArgumentError("step: no prompt yet; call prefill(ids) first")
        if self.length >= self.max_tokens:
            raise InvalidArgumentError(
                f"max_tokens: the sequences hold {self.length} tokens, max_tokens "
                f"{self.max_tokens}; create the decoder with a larger max_tokens")
        if self.attention_backend is None:
            self._choose_backend()
        if self._graph is not None:
            self._before_replay()
            self._graph.replay()
            logits = self._graph_logits
        elif self.cuda_graph and self._warm:
            self._graph = torch.cuda.CUDAGraph()
            # capturing records the step's kernels without running them; the replay runs them
            with torch.cuda.graph(self._graph):
                self._graph_logits = self._decode()
            self._graph.replay()
            logits = self._graph_logits
        else:
            logits = self._decode()
            self._warm = True
        self.length += 1
        self._after_step()
        return logits

    def _before_replay(self) -> None:
        """Host bookkeeping a replayed step needs before it runs (none: the dense cache is
        device tensors only)."""

    def _after_step(self) -> None:
        """Host bookkeeping after every step (none here)."""


class SalsGraphDecoder(DenseGraphDecoder):
    """``DenseGraphDecoder``'s decode loop with SALS attention: ``model`` patched by
    ``sals.hf.patch`` (without ``cuda_graph`` or ``compile``: this loop captures its own step),
    every layer's attention served by a ``sals.hf.SalsCache`` of ``max_batch`` sequences and
    ``max_tokens`` tokens, the rest of the step (fused projections, norms, MLP, lm_head) the
    dense decoder's own. So a ``sals-*-graph`` row of ``bench e2e`` and ``dense-graph`` differ
    in attention only.

    ``prefill`` fills the cache one sequence at a time through the patched model
    (``sals.hf.prefill``: exact attention over each prompt, then compressed), all but each
    prompt's last token; that token is the first decode step. ``cache_bytes`` is what the
    SalsCache allocated; ``attention_backend`` is ``"sals"``.
    """

    def __init__(self, model, max_batch: int, max_tokens: int, cuda_graph: bool = True,
                 compile: bool = False):
        from ..hf import patch_state

        state = patch_state(model)  # InvalidArgumentError when the model is not patched
        if state.cuda_graph or state.compile:
            raise UnsupportedError(
                "model: patched with cuda_graph=True or compile=True, which run the model's own "
                "decode step; SalsGraphDecoder captures its own: patch without them")
        self.model = model
        super().__init__(model, max_batch, max_tokens, cuda_graph, compile)
        self.attention_backend = "sals"

    def _make_cache(self, model) -> int:
        from ..hf import SalsCache, graphs

        self.cache = SalsCache(model, self.max_batch, self.max_tokens)
        self._sals = graphs.sals_layers(self.cache)  # the layers a step's bookkeeping touches
        return int(self.cache.memory()["allocated"])

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """As ``DenseGraphDecoder.prefill``, into the SalsCache (emptied first)."""
        from ..hf import prefill

        b, s = self._check_prompts(ids)
        self._new_batch(b)
        ids = ids.to(device=self.device, dtype=torch.long)
        self.cache.reset()
        prefill(self.model, self.cache, ids, rows=1)
        self.batch, self.length = b, s - 1
        self._token[:b].copy_(ids[:, -1:])
        self._pos.fill_(s - 1)
        return self.step()

    def _attend(self, b: int):
        """The attention of a decode step of rows 0..b-1: each SALS layer stores the step's
        pre-RoPE key and value at position _pos and attends (an ExactLayer of
        ``dense_kv="exact"`` writes its slot _pos too: prompts have equal lengths, so slot =
        position)."""
        positions = self._pos.to(torch.int32).view(1, 1).expand(b, 1).contiguous()

        def run(i, q, k, v):
            layer = self.cache.layers[i]
            layer.store(k, v, positions, self._pos)
            return layer.attend(q, positions)
        return run

    def _choose_backend(self) -> None:
        pass  # the SALS layers choose their own (an ExactLayer picks cuDNN where it can)

    def _before_replay(self) -> None:
        from ..hf import graphs

        graphs.reserve(self._sals, self.batch)

    def _after_step(self) -> None:
        from ..hf import graphs

        graphs.advance(self._sals, self.batch)
