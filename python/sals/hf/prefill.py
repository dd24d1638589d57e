"""sals.hf.prefill: fill a SalsCache a group of sequences at a time.

A batch's prompts prefilled in one forward need the activations of every prompt token at once;
a batch the compressed cache could hold then runs out of memory before its first decode step.
Filled by groups of ``rows`` sequences (and chunks of ``chunk_tokens`` tokens), a prefill needs
the activations of one group and chunk only, and the cache, not the prompt, decides how many
sequences fit. Each group's forward writes its rows of the cache through the range entry points
(``LayerCache.append(..., first=)``), which leave each sequence as a whole-batch fill would.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from .. import CapacityError, InvalidArgumentError, _args
from .cache import SalsCache, SalsLayer
from .state import patch_state


def prefill(model, cache: SalsCache, input_ids: torch.Tensor, attention_mask=None,
            rows: int = 1, chunk_tokens: int | None = None) -> SalsCache:
    """Fill ``cache`` with every token of each prompt but the last, ``rows`` sequences and (with
    ``chunk_tokens``) that many tokens per forward. Returns ``cache``.

    Then ``model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=N,
    **{sals.hf.CACHE_ARG: cache})`` feeds each prompt's last token (a decode step over the
    filled cache) and goes on; so does a hand-written loop that feeds ``input_ids[:, -1:]``
    (``examples/decode_loop.py``). Prompt row b is sequence b of the cache.

    ``model``: patched by ``sals.hf.patch``. ``cache``: an empty SalsCache of that patch, with
    ``max_batch >= B`` and ``max_tokens >=`` S - 1 plus the tokens to generate.
    ``input_ids``: ``[B, S]`` token ids. ``attention_mask``: ``[B, S]`` of 0 and 1, prompts
    left-padded (each row ends with a token), or None (no padding).
    ``rows``: sequences per forward (1: one at a time). ``chunk_tokens``: tokens per forward,
    at least 2 (None: a group's whole prompt at once).

    A group's forward covers the columns where one of its prompts has a token: with ``rows=1``
    each prompt is prefilled alone, without its padding. Sequences do not interact, so the
    groups change nothing but float rounding. Chunks are another matter: a group's first chunk
    runs the model's own attention on exact keys, as a one-pass prefill does, but later chunks
    attend densely over the cache, whose keys below full rank are rebuilt from the latent ones
    (as any chunked prefill through a SalsCache): close to one pass, equal only at full rank.

    Bad arguments raise InvalidArgumentError or CapacityError naming them before anything is
    stored; a forward that fails midway leaves the cache empty again.
    """
    state = patch_state(model)
    if not isinstance(cache, SalsCache):
        raise InvalidArgumentError(
            f"cache: expected a sals.hf.SalsCache(model, ...), got {type(cache).__name__}")
    if cache.patch_state is not state:
        raise InvalidArgumentError(
            "cache: this SalsCache was made for another patch of the model; create a new one")
    ids, mask = _prompts(input_ids, attention_mask)
    batch, width = ids.shape
    rows = _args.integer(rows, "rows", 1)
    chunk = _args.optional_integer(chunk_tokens, "chunk_tokens", 2)
    if batch > cache.max_batch:
        raise CapacityError(
            f"input_ids: {batch} prompts, more than max_batch {cache.max_batch} of the cache")
    if width - 1 > cache.max_tokens:
        raise CapacityError(
            f"input_ids: prompts of {width} tokens need {width - 1} token slots before "
            f"generating, more than max_tokens {cache.max_tokens} of the cache")
    held = max(int(layer.row_slots.max()) if isinstance(layer, SalsLayer)
               else layer.get_seq_length() for layer in cache.layers)
    if held:
        raise InvalidArgumentError(
            f"cache: holds tokens already ({held} token slots); prefill fills an empty "
            f"SalsCache (reset() it, or create a new one)")
    filled = width - 1  # the last token of each prompt is generate's
    device = model.get_input_embeddings().weight.device
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate computes them
    # the LM head of one token per forward, not of every prompt token (large vocabularies)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.forward).parameters else {}
    kv = {state.info.cache_arg: cache}
    # sliding-window layers hold the whole batch in one window: each group fills its own,
    # joined into the batch's at the end
    windows = {i: layer for i, layer in enumerate(cache.layers)
               if not isinstance(layer, SalsLayer)}
    parts: dict[int, list] = {i: [] for i in windows}
    done = False
    cache.filling = True  # no forward here is a decode step (sals.hf.graphs)
    try:
        with torch.no_grad():
            for r0 in range(0, batch, rows):
                r1 = min(r0 + rows, batch)
                # the group's forwards start where its first prompt does
                used = mask[r0:r1, :filled].any(0)
                lead = int(used.int().argmax()) if bool(used.any()) else filled
                cache._set_first(r0)
                for i, layer in windows.items():
                    cache.layers[i] = DynamicSlidingWindowLayer(
                        sliding_window=layer.sliding_window)
                for c0, c1 in _chunks(lead, filled, chunk):
                    model(input_ids=ids[r0:r1, c0:c1], attention_mask=mask[r0:r1, lead:c1],
                          position_ids=positions[r0:r1, c0:c1], use_cache=True, **kv, **keep)
                for layer in cache.layers:
                    if isinstance(layer, SalsLayer):  # the skipped columns count too
                        layer.advance(r1 - r0, lead)
                for i in windows:
                    parts[i].append((r1 - r0, cache.layers[i]))
        for i, layer in windows.items():
            _join_windows(layer, parts[i], filled, state.info.layers[i])
        done = True
    finally:
        for i, layer in windows.items():
            cache.layers[i] = layer
        cache._set_first(0)
        cache.filling = False
        if not done:
            cache.reset()
    return cache


def _chunks(start: int, end: int, chunk: int | None) -> list[tuple[int, int]]:
    """Columns [start, end) in chunks of ``chunk`` (None: one), the shortest first: only the
    first may be a single token, as a later single-token forward over a filled cache is a
    sparse decode step, not a prefill (a first chunk attends its own exact keys whatever its
    length)."""
    if chunk is None or end - start <= chunk:
        return [(start, end)] if end > start else []
    bounds = list(range(end, start, -chunk))[::-1]
    return list(zip([start] + bounds[:-1], bounds))


def _prompts(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): the prompts and a [B, S] long mask of 0/1, checked."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
            input_ids.dtype not in (torch.int32, torch.int64) or 0 in input_ids.shape:
        raise InvalidArgumentError(
            f"input_ids: expected a non-empty [batch, tokens] tensor of token ids, got "
            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
            f"{list(getattr(input_ids, 'shape', []))}")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor) or \
            tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InvalidArgumentError(
            f"attention_mask: expected None or a tensor of input_ids' shape "
            f"{list(input_ids.shape)}, got {list(getattr(attention_mask, 'shape', []))}")
    mask = attention_mask.long()
    if ((mask != 0) & (mask != 1)).any():
        raise InvalidArgumentError("attention_mask: expected 0 (padding) and 1 (token) only")
    ends = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if ends:
        raise InvalidArgumentError(
            f"attention_mask: rows {ends} end with padding; prompts must be left-padded "
            f"(generation goes on from each row's last token)")
    return input_ids, mask


def _join_windows(layer, groups: list, filled: int, info) -> None:
    """Set the empty sliding-window cache ``layer`` (of decoder layer ``info``) to the batch of
    its groups' windows, ``groups`` being (rows, window) in row order. A group's window holds
    its last min(columns it covered, sliding_window - 1) columns (none if it covered none); the
    batch's holds min(filled, sliding_window - 1), and the columns a group did not cover are
    padding for all its rows, masked out: zeros stand in for them."""
    width = min(filled, layer.sliding_window - 1)
    blank = torch.zeros(1, info.n_head_kv, width, info.head_dim, device=info.device,
                        dtype=info.module.q_proj.weight.dtype)

    def padded(n, x, which):
        if not x.is_initialized:
            return blank.expand(n, -1, -1, -1)
        y = getattr(x, which)
        return torch.nn.functional.pad(y, (0, 0, width - y.shape[-2], 0))

    keys = torch.cat([padded(n, x, "keys") for n, x in groups])
    values = torch.cat([padded(n, x, "values") for n, x in groups])
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    layer.cumulative_length = filled
