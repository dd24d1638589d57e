"""Paged storage (``sals_paged_t``): one layer's SALS tokens in pages the caller owns.

A serving engine such as vLLM allocates the KV memory itself, in blocks of ``block_size``
tokens, and names each sequence's blocks in a block table. ``PagedLayer`` stores tokens into
such pages, one slot of ``slot_bytes`` per token (latent key, quantised value), and attends over
them; it holds only the layer's settings and projection, never tokens.

    layer = sals.PagedLayer(config, rope, projection)
    pages = numpy.zeros((num_blocks, block_size, layer.slot_bytes), numpy.uint8)
    layer.append(k, v, slot_mapping, pages)              # k, v: [N, n_head_kv, head_dim]
    out = layer.attend(q, query_start, seq_lens, block_table, pages)

The sinks and the recent window of a sequence are attended from exact copies when the caller
keeps them in a window store of its own (``window_rows``, ``window``); otherwise they are
rebuilt from their slots like every other token. Token ``i`` of a sequence is at RoPE position
``i``; a sequence's queries are its last tokens (their keys appended first). The slot layout
and every rule are those of ``sals.h``'s paged storage section.

Pages on a GPU take a layer made for it, ``PagedLayer(config, rope, projection,
device="cuda")``, and CUDA tensors (torch); the work runs on the current torch stream. There
the index tensors are checked on the device: an entry out of range is skipped, and reported
with NaN inputs by ``check()`` or the next call (see ``sals.h``).
"""

from __future__ import annotations

import sys

import numpy as np

from . import _C
from . import _tensors as _t
from .cache import _parse_device, _stream
from .config import Config, Rope
from .errors import InvalidArgumentError

_KDLCPU = 1


def _config(config) -> Config:
    if not isinstance(config, Config):
        raise InvalidArgumentError(f"config: expected sals.Config, got {type(config).__name__}")
    return config


class PagedLayer:
    """One attention layer's settings for paged storage (``sals_paged_t``).

    ``config``: the layer's ``sals.Config`` (its ``max_batch``, ``max_tokens``, ``n_threads``
    fields are not used); ``rope``: its rotary embedding; ``projection``: ``[Dk, rank]`` with
    orthonormal columns, copied. ``device``: "cpu", "cuda", "cuda:N" or a torch.device: a
    layer made for a GPU keeps device copies of its settings there and takes tensors on that
    GPU (and host tensors, as a CPU layer does). The object holds no tokens and its settings
    never change: any number of threads may use it at once.
    """

    def __init__(self, config: Config, rope: Rope, projection, device="cpu"):
        config = _config(config)
        if not isinstance(rope, Rope):
            raise InvalidArgumentError(f"rope: expected sals.Rope, got {type(rope).__name__}")
        dev_type, dev_id = _parse_device(device)
        proj = _t.tensor(projection, "projection")
        self._config = config
        self._device = (dev_type, dev_id)
        self._p = _C.Paged(config._to_c(dev_type, dev_id), rope._to_c(), proj.obj,
                           _t.stream(proj))
        self._slot_bytes = _C.paged_slot_bytes(config._to_c(_KDLCPU, 0))

    @staticmethod
    def slot_bytes_for(config: Config) -> int:
        """Bytes of one token's slot for ``config`` (checked as a cache's config)."""
        return _C.paged_slot_bytes(_config(config)._to_c(_KDLCPU, 0))

    @property
    def config(self) -> Config:
        return self._config

    @property
    def slot_bytes(self) -> int:
        """Bytes of one token's slot: pages are ``[num_blocks, block_size, slot_bytes]`` uint8."""
        return self._slot_bytes

    def append(self, k, v, slot_mapping, pages, window_rows=None, window=None,
               stream=None) -> None:
        """Store tokens into their slots, and exact copies into a window store.

        ``k``, ``v``: ``[N, n_head_kv, head_dim]`` pre-RoPE keys and values; ``slot_mapping``:
        ``[N]`` integers ``block * block_size + slot`` (negative: skip the token), each slot at
        most once; ``pages``: ``[num_blocks, block_size, slot_bytes]`` uint8, written at the
        mapped slots only. ``window_rows`` ``[N]`` and ``window`` ``[rows, 2, n_head_kv,
        head_dim]`` (both or neither): token ``n``'s key and value are also copied into row
        ``window_rows[n]`` (-1: none). ``stream``: a cudaStream_t to run on (default: torch's
        current stream of the inputs' device).
        """
        kt, vt = _t.tensor(k, "k"), _t.tensor(v, "v")
        st = _t.index(slot_mapping, "slot_mapping", kt)
        rows = None if window_rows is None else _t.index(window_rows, "window_rows", kt).obj
        store = None if window is None else _t.output(window, "window").obj
        stream = _stream(stream)
        self._p.append(kt.obj, vt.obj, st.obj, _t.output(pages, "pages").obj, rows, store,
                       stream if stream is not None else _t.stream(kt))

    def attend(self, q, query_start, seq_lens, block_table, pages, window_rows=None,
               window=None, out=None, return_selected: bool = False, stream=None):
        """Attention of each sequence's new queries over its stored tokens.

        ``q``: ``[N, n_head_q, head_dim]`` pre-RoPE queries, sequence ``b``'s being rows
        ``query_start[b] .. query_start[b + 1] - 1``, at positions ``seq_lens[b] - n_b ..
        seq_lens[b] - 1``; ``query_start``: ``[B + 1]``; ``seq_lens``: ``[B]`` tokens stored
        (its queries' own included); ``block_table``: ``[B, max_blocks]``; ``pages`` as for
        append. ``window_rows`` ``[B, n_sink + n_recent]`` and ``window`` (both or neither):
        the rows holding exact copies of each sequence's sinks (``[b, t]``) and recent tokens
        (token ``t`` at ``[b, n_sink + n_recent - seq_lens[b] + t]``), -1 where a token has
        none and is rebuilt from its slot. Returns ``out`` (a new ``[N, n_head_q, head_dim]``
        array of q's dtype when None; rows outside the sequences' ranges are left as they are),
        and with ``return_selected`` also the selection: int32 ``[B, H, K]`` token indices
        (H = 1 shared, n_head_kv per head; -1 padded; all -1 for a sequence without a sparse
        step), numpy for host inputs, else a tensor on q's device (whose K covers the block
        table's capacity: nothing is read back from the device). ``stream`` as for append.
        A sequence with one query on a sparse layer takes a SALS decode step; otherwise its
        queries attend every visible token (causal).
        """
        qt = _t.tensor(q, "q")
        qs = _t.index(query_start, "query_start", qt)
        lens = _t.index(seq_lens, "seq_lens", qt)
        table = _t.index(block_table, "block_table", qt)
        pt = _t.tensor(pages, "pages")
        if out is None:
            if len(qt.shape) != 3:
                raise InvalidArgumentError(
                    f"q: expected 3 dims [N, n_head_q, head_dim], got {len(qt.shape)}")
            out = _t.empty(qt, qt.shape, qt.dtype)
        rows = None if window_rows is None else _t.index(window_rows, "window_rows", qt).obj
        store = None if window is None else _t.tensor(window, "window").obj
        selected = None
        if return_selected:
            selected = self._selection_buffer(qs, lens, table, pt)
        stream = _stream(stream)
        self._p.attend(qt.obj, qs.obj, lens.obj, table.obj, pt.obj, _t.output(out, "out").obj,
                       rows, store, selected, stream if stream is not None else _t.stream(qt))
        return (out, selected) if return_selected else out

    def check(self, wait: bool = True, stream=None) -> None:
        """Raise what the deferred checks of earlier CUDA calls found: NotFiniteError for NaN or
        infinity in an input (``check_finite``), InvalidArgumentError for an index out of range
        (skipped on the device), each naming the argument; reported once, here or by the next
        append/attend. ``wait`` first waits for the stream; ``wait=False`` reads the flags
        without synchronising. A no-op for a layer made for the CPU."""
        stream = _stream(stream)
        torch = sys.modules.get("torch")
        if stream is None and self._device[0] == _t.KDLCUDA and torch is not None:
            stream = torch.cuda.current_stream(self._device[1]).cuda_stream
        self._p.check(bool(wait), stream)

    def _selection_buffer(self, qs: _t.Tensor, lens: _t.Tensor, table: _t.Tensor,
                          pages: _t.Tensor):
        """An int32 [B, H, K] for attend's selection, K the longest a sparse step of this call
        may select: Config.most_selected at the longest single-query sequence, or on a GPU at
        the block table's capacity (shapes only: no read back)."""
        cfg = self._config
        heads = cfg.n_head_kv if cfg.select_per_head else 1
        if qs.is_cuda:
            if len(lens.shape) != 1 or len(table.shape) != 2 or len(pages.shape) != 3:
                raise InvalidArgumentError(
                    f"seq_lens, block_table, pages: expected 1, 2 and 3 dims, got "
                    f"{len(lens.shape)}, {len(table.shape)} and {len(pages.shape)}")
            most = max(cfg.most_selected(int(table.shape[1]) * int(pages.shape[1])), 1)
            return _t.empty(qs, (int(lens.shape[0]), heads, most), "int32")
        starts, lengths = _t.to_numpy(qs.obj).astype(np.int64), _t.to_numpy(lens.obj)
        if starts.ndim != 1 or lengths.ndim != 1 or starts.size != lengths.size + 1:
            raise InvalidArgumentError(
                f"query_start: expected [B + 1] with seq_lens [B], got shapes "
                f"{list(starts.shape)} and {list(lengths.shape)}")
        single = np.diff(starts) == 1
        longest = int(lengths[single].max()) if single.any() else 0
        most = max(cfg.most_selected(longest), 1)
        return np.empty((lengths.size, heads, most), np.int32)

    def __repr__(self) -> str:
        return f"PagedLayer({self._config}, slot_bytes={self._slot_bytes})"
