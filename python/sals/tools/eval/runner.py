"""The eval's measurements: every setting on the same prompts, from one shared prefill.

Per prompt the model runs its prefill once, densely, on exact keys (what every setting does:
a SALS-patched model also runs the model's own attention over a prompt, then compresses it),
keeping the dense cache and the pre-RoPE keys and values of every full-attention layer. Each
setting then starts from that state:

- ``dense``: a copy of the dense cache;
- a SALS setting (any preset, ``auto`` or Config override): the model patched with it and a
  new ``SalsCache`` into which the prompt's pre-RoPE keys and values are appended, exactly as
  the patched prefill would append them (sliding-window layers get a copy of the dense window);
- ``streaming=REF`` / ``oracle=REF``: a copy of the dense cache and the attention of
  ``sals.tools.eval.baselines``, sized from the SALS setting REF measured on the same prompt.

and generates greedily from the prefill's last logits (the first token is the same for all).
``tests/hf/test_eval.py`` checks this path against ``model.generate`` on the patched model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import torch

from ... import InvalidArgumentError, presets
from . import baselines
from .records import LayerStats, Measurement

#: the preset names a setting starts with: ``sals.presets``' names, "auto" and "none"
PRESETS = (*presets.NAMED, "auto", "none")


@dataclasses.dataclass
class Setting:
    """One row of the eval. ``spec`` grammar (no spaces, no commas):

    - ``dense``;
    - ``PRESET[:FIELD=VALUE...]``: PRESET one of ``PRESETS`` ("none": ``sals.Config``
      defaults), FIELD any ``sals.Config`` field, ``kv_fraction``/``kv_context`` (auto's
      arguments, read by ``sals.presets.parse``),
      ``dense_layers`` (``0/1/29`` or ``none``) or ``calib=SOURCE/TOKENS[/QW]`` (this row's
      calibration, e.g. ``calib=stdlib/4096``, or ``calib=debian-docs/16384/0`` for plain PCA;
      QW, the query weight, defaults to the eval's);
    - ``streaming=SPEC`` (StreamingLLM holding the bytes SPEC holds), ``oracle=SPEC`` (exact
      top-k at SPEC's budget).
    """

    spec: str
    kind: str                  # dense | sals | streaming | oracle
    preset: presets.Preset | None = None
    overrides: dict = dataclasses.field(default_factory=dict)
    dense_layers: tuple | None = None
    calib: tuple | None = None  # (source, tokens, query weight or None: the eval's)
    ref: str | None = None

    @property
    def name(self) -> str:
        return self.spec


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_setting(spec: str) -> Setting:
    """A ``Setting`` from its spec (see ``Setting``); ValueError naming what is wrong."""
    spec = spec.strip()
    if not spec:
        raise ValueError("setting: empty")
    if spec == "dense":
        return Setting(spec, "dense")
    for kind in ("streaming", "oracle"):
        if spec.startswith(kind + "="):
            ref = parse_setting(spec[len(kind) + 1:])
            if ref.kind != "sals":
                raise ValueError(f"setting {spec!r}: {kind}= needs a SALS setting, got "
                                 f"{ref.spec!r}")
            return Setting(spec, kind, ref=ref.spec)
    head, *fields = spec.split(":")
    if head not in PRESETS:
        raise ValueError(f"setting {spec!r}: unknown preset {head!r}; expected dense, one of "
                         f"{PRESETS}, streaming=SPEC or oracle=SPEC")
    setting = Setting(spec, "sals")
    for field in fields:
        if "=" not in field:
            raise ValueError(f"setting {spec!r}: {field!r} is not FIELD=VALUE")
        key, val = field.split("=", 1)
        if key == "calib":
            source, _, rest = val.partition("/")
            tokens, _, weight = rest.partition("/")
            weight = _value(weight) if weight else None
            if not tokens.isdigit() or not (weight is None or isinstance(weight, (int, float))
                                            and not isinstance(weight, bool)):
                raise ValueError(
                    f"setting {spec!r}: calib= expects SOURCE/TOKENS[/QUERY_WEIGHT], got {val!r}")
            setting.calib = (source, int(tokens), None if weight is None else float(weight))
        elif key == "dense_layers":
            setting.dense_layers = () if val == "none" else tuple(int(x) for x in val.split("/"))
        else:
            setting.overrides[key] = _value(val)
    try:
        # takes auto's kv_fraction and kv_context out of the overrides, refuses them elsewhere
        setting.preset = presets.parse(None if head == "none" else head, setting.overrides)
    except InvalidArgumentError as e:
        raise ValueError(f"setting {spec!r}: {e}") from None
    return setting


# ---- prefill ----------------------------------------------------------------------------


@dataclasses.dataclass
class Prefill:
    ids: torch.Tensor          # [1, n]
    logits: torch.Tensor       # [vocab], the last prompt token's
    cache: object              # the dense DynamicCache
    keys: dict                 # full-attention layer -> [1, n, Hkv, d] pre-RoPE
    values: dict

    @property
    def n(self) -> int:
        return int(self.ids.shape[1])


def prefill(model, info, ids: torch.Tensor) -> Prefill:
    """Dense prefill of ``ids`` keeping the pre-RoPE keys and values of every full layer."""
    from ...hf import CACHE_ARG, pre_rope

    keys, values = {}, {}

    def hook(index):
        def pre_hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            _, keys[index], values[index] = pre_rope(module, hidden, with_query=False)
        return pre_hook

    handles = [layer.module.register_forward_pre_hook(hook(layer.index), with_kwargs=True)
               for layer in info.layers if not layer.sliding]
    try:
        with torch.no_grad():
            out = model(ids.to(model.device), use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return Prefill(ids, out.logits[0, -1].float(), getattr(out, CACHE_ARG), keys, values)


# ---- decoding ---------------------------------------------------------------------------


def _step(model, token: int, position: int, cache):
    from ...hf import CACHE_ARG

    with torch.no_grad():
        out = model(input_ids=torch.tensor([[token]], device=model.device),
                    position_ids=torch.tensor([[position]], device=model.device), use_cache=True,
                    **{CACHE_ARG: cache})
    return out.logits[0, -1].float()


def greedy(model, pre: Prefill, cache, max_new: int, stop: set, first_step=None,
           done=None) -> list[int]:
    """Greedy tokens after the prompt; ``first_step()`` runs after the first decode step;
    generation ends early once ``done(tokens)`` is true."""
    tokens = [int(pre.logits.argmax())]
    while len(tokens) < max_new and tokens[-1] not in stop and not (done and done(tokens)):
        logits = _step(model, tokens[-1], pre.n + len(tokens) - 1, cache)
        if first_step is not None and len(tokens) == 1:
            first_step()
        tokens.append(int(logits.argmax()))
    return tokens


def teacher_forced(model, pre: Prefill, cache, continuation: list[int]) -> list[float]:
    """NLL of continuation[1:], each predicted by a decode step fed the previous token."""
    nll = []
    for i, token in enumerate(continuation[:-1]):
        logits = _step(model, token, pre.n + i, cache)
        nll.append(float(-logits.log_softmax(-1)[continuation[i + 1]]))
    return nll


# ---- one setting on one prompt -----------------------------------------------------------


class Runner:
    """Holds the model, its calibrations and the parsed settings; runs them on prefills."""

    def __init__(self, model, tokenizer, settings: list[Setting], calibrations: dict,
                 default_calib: tuple, threads: int = 0):
        import sals.hf

        from ...hf import describe, modeling_function, patch_state

        self.sals_hf = sals.hf
        self.patch_state = patch_state
        self.model, self.tokenizer = model, tokenizer
        self.info = describe(model)
        self.settings = {s.name: s for s in settings}
        self.calibrations = calibrations
        self.default_calib = default_calib
        self.threads = threads
        self.full = [layer for layer in self.info.layers if not layer.sliding]
        self.apply_rope = modeling_function(self.full[0].module, "apply_rotary_pos_emb")
        stop = model.generation_config.eos_token_id
        stop = set(stop if isinstance(stop, list) else [stop]) if stop is not None else set()
        if tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        self.stop = stop
        self.describe = {}
        for s in settings:  # every SALS setting patched once now: bad settings fail early
            if s.kind == "sals":
                self._patch(s)
                state = self.patch_state(model)
                self.describe[s.name] = {
                    str(i): {"rank": c.resolved_rank(), "score_rank": c.resolved_score_rank(),
                             "key_bits": c.key_bits, "key_group": c.key_group,
                             "value_bits": c.value_bits, "value_group": c.value_group,
                             "dense": c.dense, "dk": c.dk, "n_sink": c.n_sink,
                             "n_recent": c.n_recent, "budget_frac": c.budget_frac,
                             "budget_tokens": c.budget_tokens}
                    for i, c in state.configs.items()}
                # dense layers patched with dense_kv=exact: exact keys and values, no settings
                self.describe[s.name].update({str(i): {"dense": True, "dense_kv": "exact"}
                                              for i in state.exact})
                self.sals_hf.unpatch(model)

    def _patch(self, s: Setting):
        overrides = dict(s.overrides)
        if self.threads and "n_threads" not in overrides:
            overrides["n_threads"] = self.threads
        calib = self.calibrations[s.calib or self.default_calib]
        self.sals_hf.patch(self.model, calibration=calib, preset=s.preset,
                           dense_layers=s.dense_layers, **overrides)

    def _fill(self, pre: Prefill, max_tokens: int):
        """A SalsCache holding the prompt, as the patched prefill would leave it."""
        cache = self.sals_hf.SalsCache(self.model, 1, max_tokens)
        positions = torch.arange(pre.n, dtype=torch.int32, device=self.model.device)[None]
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, self.sals_hf.SalsLayer):
                layer.append(pre.keys[i], pre.values[i], positions)
            else:
                cache.layers[i] = copy.deepcopy(pre.cache.layers[i])
        return cache

    def memory_fraction(self, cache) -> tuple[float, float]:
        """(of dense fp16 K+V of the full-attention layers, of the whole model's dense fp16
        cache with sliding windows counted as fp16 windows on both sides)."""
        mem = cache.memory()
        sals_bytes = mem["total"] - mem["window"]
        window_fp16 = 0
        for layer in cache.layers:
            if not isinstance(layer, self.sals_hf.SalsLayer) and layer.keys is not None:
                window_fp16 += 2 * layer.keys.numel() * 2
        return (sals_bytes / mem["dense_fp16"],
                (sals_bytes + window_fp16) / (mem["dense_fp16"] + window_fp16))

    def _window_fraction(self, cache_tokens: int, window: int, pre: Prefill) -> tuple:
        """Memory fractions of a StreamingLLM cache keeping ``window`` tokens per layer."""
        kept = min(cache_tokens, window)
        full = sum(4 * layer.dk for layer in self.full)
        sliding = 0
        for layer in self.info.layers:
            if layer.sliding:
                sliding += 4 * layer.dk * min(cache_tokens, layer.sliding_window - 1)
        return kept / cache_tokens, (kept * full + sliding) / (cache_tokens * full + sliding)

    def run(self, s: Setting, pre: Prefill, measured: dict[str, Measurement],
            continuation=None, max_new: int = 16, measure_layers: bool = False,
            done=None) -> Measurement:
        """One setting on one prefill: generated tokens (or NLLs of ``continuation``),
        memory fractions, and for SALS settings with ``measure_layers`` the per-layer
        overlap and key error. ``measured``: measurements of the settings already run on it,
        by name; ``done(tokens)``: stop generating early (all answers found: the score cannot
        change)."""
        self.done = done
        model = self.model
        n_new = len(continuation) if continuation is not None else max_new
        start = time.perf_counter()
        prefill_fraction = layers = window = None
        if s.kind == "dense":
            cache = copy.deepcopy(pre.cache)
            out = self._decode(pre, cache, continuation, max_new)
            fractions = (1.0, 1.0)
        elif s.kind == "sals":
            self._patch(s)
            try:
                cache = self._fill(pre, pre.n + n_new + 1)
                prefill_fraction = self.memory_fraction(cache)[0]
                layers = {} if measure_layers else None
                hook = self._overlap_hooks(cache, pre, layers) if measure_layers else None
                out = self._decode(pre, cache, continuation, max_new,
                                   first_step=hook and hook.finish)
                if hook is not None:
                    hook.remove()
                    self._key_errors(pre, layers)
                fractions = self.memory_fraction(cache)
                cache.close()
            finally:
                self.sals_hf.unpatch(model)
        else:
            if s.ref not in measured:
                raise InvalidArgumentError(f"setting {s.name!r}: {s.ref!r} must run first")
            cache = copy.deepcopy(pre.cache)
            if s.kind == "streaming":
                window = max(1, round(measured[s.ref].kv_fraction_prefill * pre.n))
                sink = min(4, window)
                policy = baselines.Policy("streaming", frozenset(lay.index for lay in self.full),
                                          sink, window - sink)
            else:
                cfg = self.describe[s.ref]
                sparse = frozenset(int(i) for i, c in cfg.items() if not c["dense"])
                c = next(c for c in cfg.values() if not c["dense"])
                policy = baselines.Policy("oracle", sparse, c["n_sink"], c["n_recent"],
                                          c["budget_frac"], c["budget_tokens"])
            with baselines.selecting(model, policy):
                out = self._decode(pre, cache, continuation, max_new)
            if s.kind == "streaming":
                fed = len(out) - 1 if continuation is None else len(continuation) - 1
                fractions = self._window_fraction(pre.n + fed, window, pre)
            else:
                fractions = (1.0, 1.0)
        return Measurement(
            kv_fraction_prefill=prefill_fraction, layers=layers, window=window,
            kv_fraction=fractions[0], kv_fraction_model=fractions[1],
            seconds=time.perf_counter() - start,
            tokens=out if continuation is None else None,
            nll=out if continuation is not None else None)

    def _decode(self, pre, cache, continuation, max_new, first_step=None):
        if continuation is not None:
            return teacher_forced(self.model, pre, cache, continuation)
        return greedy(self.model, pre, cache, max_new, self.stop, first_step, self.done)

    def _overlap_hooks(self, cache, pre: Prefill, layers: dict[int, LayerStats]):
        return _OverlapHooks(self, cache, pre, layers)

    def _key_errors(self, pre: Prefill, layers: dict[int, LayerStats]) -> None:
        from ...hf.calibrate import rebuilt_keys

        state = self.patch_state(self.model)
        for index, proj in state.projections.items():
            k = pre.keys[index][0].reshape(pre.n, -1).float()
            rebuilt = rebuilt_keys(k, proj, state.key_scales[index])
            err = torch.linalg.norm(k - rebuilt) / torch.linalg.norm(k)
            # overlap stats exist only for layers that select tokens, after a decode step
            layers.setdefault(index, LayerStats()).key_rel_error = float(err)


class _OverlapHooks:
    """At the first decode step of a SALS setting: each sparse layer's query (post-RoPE), to
    compare the tokens SALS kept against exact attention over exact keys (the paper's overlap
    score: attention mass kept)."""

    def __init__(self, runner: Runner, cache, pre: Prefill, layers: dict[int, LayerStats]):
        self.runner, self.cache, self.pre, self.layers = runner, cache, pre, layers
        self.queries = {}
        state = runner.patch_state(runner.model)
        self.configs = state.configs
        self.handles = []
        for layer in runner.full:
            if layer.index in state.exact or state.configs[layer.index].dense:
                continue
            self.handles.append(layer.module.register_forward_pre_hook(
                self._hook(layer.index), with_kwargs=True))

    def _hook(self, index):
        from ...hf import pre_rope

        def pre_hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            q, k, _ = pre_rope(module, hidden, with_value=False)
            cos, sin = kwargs["position_embeddings"]
            qr, kr = self.runner.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            self.queries[index] = (qr.detach(), kr.detach(), float(module.scaling))
        return pre_hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self):
        self.remove()
        for index, (q, k_new, scaling) in self.queries.items():
            keys = torch.cat([self.pre.cache.layers[index].keys, k_new], dim=2)[0].float()
            hkv, S, d = keys.shape
            hq = q.shape[1]
            qh = q[0, :, 0].float().view(hkv, hq // hkv, d)
            p = torch.einsum("hgd,hsd->hgs", qh, keys).mul(scaling).softmax(-1)
            p = p.reshape(hq, S)
            cfg = self.configs[index]
            idx, count = self.cache.layers[index].layer_cache.selected()
            sel = torch.from_numpy(idx[0, 0, :int(count[0])].astype(np.int64)).to(p.device)
            window = torch.zeros(S, dtype=torch.bool, device=p.device)
            window[:min(S, cfg.n_sink)] = True
            window[max(0, S - cfg.n_recent):] = True
            kept = window.clone()
            kept[sel] = True
            total = p.sum(0)                              # summed over heads, [S]
            cand = total[~window].sum()
            top = total[~window].topk(len(sel)).values.sum() if len(sel) else total.new_zeros(())
            self.layers[index] = LayerStats(
                mass_kept=float(p[:, kept].sum(-1).mean()),
                mass_window=float(p[:, window].sum(-1).mean()),
                recall=float(total[sel].sum() / cand) if cand > 0 else 1.0,
                oracle_recall=float(top / cand) if cand > 0 else 1.0,
                selected=len(sel),
                tokens=int(S),
            )


def agreement(tokens: list[int], dense: list[int]) -> int:
    """Generated tokens equal to dense's, counted up to the first difference."""
    n = 0
    for a, b in zip(tokens, dense):
        if a != b:
            break
        n += 1
    return n


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(sum(xs) / len(xs)) if xs else float("nan")
