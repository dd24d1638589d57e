"""The per-layer SALS cache (``sals_cache_t``)."""

from __future__ import annotations

import sys

import numpy as np

from . import _C, _args
from . import _tensors as _t
from .config import Config, Rope
from .errors import InvalidArgumentError, UnsupportedError


def _parse_device(device) -> tuple[int, int]:
    """"cpu", "cuda", "cuda:N" or a torch.device -> DLPack (device_type, device_id)."""
    text = str(device)
    if text == "cpu":
        return _t.KDLCPU, 0
    if text == "cuda":
        # torch's current device when torch can see one; otherwise the library reports the
        # missing GPU or CUDA build itself.
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return _t.KDLCUDA, torch.cuda.current_device()
        return _t.KDLCUDA, 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return _t.KDLCUDA, int(text[5:])
    raise InvalidArgumentError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class LayerCache:
    """One attention layer's compressed KV cache for up to ``config.max_batch`` sequences.

    ``projection``: ``[Dk, rank]`` (U_r, orthonormal columns; any DLPack array on any device),
    copied into the cache. ``rope`` is copied. ``device``: "cpu", "cuda", "cuda:N" or a
    torch.device. All memory is allocated here; append/attend allocate nothing in the library.

    On CUDA, work runs on the current torch stream of the inputs' device (or ``stream=`` where
    a method takes one). Use as a context manager or call ``close()``; any call after
    ``close()`` raises InvalidArgumentError (a ValueError).

    One cache is used by one thread at a time: a call (or ``close()``) while another thread is
    inside a call of the same cache raises InvalidArgumentError instead of racing. Distinct
    caches may be used from distinct threads.
    """

    def __init__(self, config: Config, rope: Rope, projection, device="cpu"):
        if not isinstance(config, Config):
            raise InvalidArgumentError(f"config: expected sals.Config, got {type(config).__name__}")
        if not isinstance(rope, Rope):
            raise InvalidArgumentError(f"rope: expected sals.Rope, got {type(rope).__name__}")
        dev_type, dev_id = _parse_device(device)
        proj = _t.tensor(projection, "projection")
        self._config = config
        self._device = (dev_type, dev_id)
        self._last_rows = (0, 0)  # (first, B) of the last attend: what selected() reports
        self._c = _C.Cache(config._to_c(dev_type, dev_id), rope._to_c(), proj.obj, _t.stream(proj))

    @property
    def config(self) -> Config:
        """The Config this cache was created with."""
        return self._config

    @property
    def closed(self) -> bool:
        return self._c.closed

    def append(self, k, v, positions, stream=None, *, first: int = 0) -> None:
        """Append a chunk of tokens to sequences ``first..first+B-1``.

        ``k``, ``v``: ``[B, T, n_head_kv, head_dim]`` pre-RoPE keys and values (float32, float16
        or bfloat16; last dim contiguous); row b goes to sequence ``first + b``, and no other
        sequence is touched. ``positions``: ``[B, T]`` integer positions; a position < 0 marks
        padding (not stored). Raises CapacityError if ``first + B > max_batch`` or the chunk
        could pass ``max_tokens`` of a sequence (each append reserves T slots of each of its
        sequences), InvalidArgumentError if ``first < 0``; nothing is changed then.

        Filling sequences one (or a few) at a time, each in chunks, in any order, leaves each
        sequence as one append of the whole batch does (byte for byte on the CPU; on CUDA
        latent keys within float32 rounding): a prefill then needs the activations of one group
        of sequences only (``sals.hf.prefill``).
        """
        self._check_open("append")
        first = _first(first)
        kt = _t.tensor(k, "k")
        vt = _t.tensor(v, "v")
        pt = _t.index(positions, "positions", kt)
        stream = _stream(stream)
        self._c.append(kt.obj, vt.obj, pt.obj, stream if stream is not None else _t.stream(kt),
                       first=first)

    def attend(self, q, positions, out=None, stream=None, *, first: int = 0):
        """Attention of ``q`` over everything the cache holds (append the step's keys first),
        for sequences ``first..first+B-1`` (row b of q is sequence ``first + b``).

        ``q``: ``[B, T, n_head_q, head_dim]`` pre-RoPE queries, ``positions``: ``[B, T]``
        (a query at a position < 0 is padding; its output row is 0). Returns ``out``, or a new
        ``[B, T, n_head_q, head_dim]`` tensor of q's dtype in q's framework. T == 1 on a sparse
        layer is a SALS decode step; T > 1 or a dense layer attends every visible token. A
        sequence gets what an attend of the whole batch gives it, up to float32 rounding.
        Errors on ``first`` as in :meth:`append`.
        """
        self._check_open("attend")
        first = _first(first)
        qt = _t.tensor(q, "q")
        pt = _t.index(positions, "positions", qt)
        stream = _stream(stream)
        if out is None:
            if len(qt.shape) != 4:
                raise InvalidArgumentError(f"q: expected 4 dims [B, T, n_head_q, head_dim], "
                                           f"got {len(qt.shape)}")
            out = _t.empty(qt, qt.shape, qt.dtype)
        self._c.attend(qt.obj, pt.obj, _t.output(out, "out").obj,
                       stream if stream is not None else _t.stream(qt), first=first)
        self._last_rows = (first, int(qt.shape[0]))
        return out

    def _check_open(self, method: str) -> None:
        if self._c.closed:
            raise InvalidArgumentError(f"cache: is closed ({method}() after close())")

    def reserve(self, batch: int, tokens: int) -> None:
        """Reserve ``tokens`` more slots for each of sequences ``0..batch-1`` without appending:
        for appends the library does not see, i.e. replays of a captured CUDA graph. Raises
        CapacityError (reserving nothing) if a sequence would pass ``max_tokens``."""
        self._c.reserve(int(batch), int(tokens))

    def check(self, wait: bool = True, stream=None) -> None:
        """Raise NotFiniteError, naming the argument, if a deferred finite check found NaN or
        infinity in an earlier call's input (``check_finite`` on CUDA: the check runs on the
        device and is reported here or by the next append/attend). ``wait`` first waits for the
        stream; ``wait=False`` reads the flag without synchronising. A no-op on the CPU."""
        self._c.check(bool(wait), stream if stream is not None else self._stream())

    def _host_int32(self, shape):
        """An int32 buffer the library can write for this cache's device (numpy on the CPU)."""
        if self._device[0] == _t.KDLCPU:
            return np.empty(shape, np.int32)
        torch = sys.modules.get("torch")
        if torch is None:
            raise UnsupportedError("reading a CUDA cache's lengths or selection needs torch")
        return torch.empty(shape, dtype=torch.int32, device=f"cuda:{self._device[1]}")

    def lengths(self) -> np.ndarray:
        """Tokens held per sequence: numpy int32 ``[max_batch]``."""
        self._check_open("lengths")
        buf = self._host_int32((self._config.max_batch,))
        self._c.lengths(buf, self._stream())
        return _t.to_numpy(buf)

    def selected(self) -> tuple[np.ndarray, np.ndarray]:
        """The candidates selected by the last attend for its sequences: ``(idx, count)``.

        ``idx``: numpy int32 ``[B, H, N]`` token slots (0-based, not positions) of sequences
        ``first..first+B-1`` of the last attend (its batch; 1 before any), H = 1 (shared
        selection) or n_head_kv (per head), N = max(count); unused entries are -1 and order
        within a row is unspecified (compare as sets). ``count``: numpy int32 ``[B]``, 0 after
        a dense or multi-token attend, or for a sequence reset since.
        """
        self._check_open("selected")
        cfg = self._config
        heads = cfg.n_head_kv if cfg.select_per_head else 1
        first, b = self._last_rows
        b = max(b, 1)
        # the library reports sequences 0..end-1; the buffer bounds every one of them
        end = min(first + b, cfg.max_batch)
        idx = self._host_int32((end, heads, self._most_selected(self.lengths()[:end])))
        count = self._host_int32((end,))
        self._c.selected(idx, count, self._stream())
        idx, count = _t.to_numpy(idx)[first:end], _t.to_numpy(count)[first:end]
        n = int(count.max()) if count.size else 0
        return np.ascontiguousarray(idx[:, :, :n]), np.ascontiguousarray(count)

    def _most_selected(self, lengths: np.ndarray) -> int:
        """An upper bound of the candidates the last attend selected for sequences of these
        ``lengths``, to size ``selected()``'s buffer by the answer instead of by max_tokens.

        A selection was made at a length no greater than today's (lengths only grow until
        reset(), which also clears the selection), and Config.most_selected is non-decreasing
        in the length: the rule at the longest length bounds every sequence's count."""
        return self._config.most_selected(int(lengths.max()))

    def memory(self) -> dict:
        """Bytes held, per component (the ``sals_memory_t`` fields): latent_keys (with
        ``key_bits`` < 16 their codes plus float16 scales and zeros), values, value_scales,
        exact_window, positions, projection, total; dense_fp16 is what dense fp16 K and V would
        need for the same tokens; allocated is everything the cache allocated."""
        return self._c.memory(self._stream())

    def reset(self, *, first: int = 0, batch: int | None = None) -> None:
        """Empty sequences ``first..first+batch-1`` (by default every sequence from ``first``
        on: all of them); the others are kept and memory stays allocated. A serving engine
        frees the slot of a finished sequence this way and admits a new one into it with
        ``append(..., first=slot)``. Raises InvalidArgumentError (``first`` or ``batch`` < 0) or
        CapacityError (past ``max_batch``), naming the argument and resetting nothing."""
        self._check_open("reset")
        first = _first(first)
        if batch is None:
            batch = max(self._config.max_batch - first, 0)
        self._c.reset_range(first, _args.integer(batch, "batch", -(2**63), 2**63 - 1),
                            self._stream())

    def close(self) -> None:
        """Free the cache's memory now. Idempotent."""
        self._c.close()

    def _stream(self):
        torch = sys.modules.get("torch")
        if self._device[0] == _t.KDLCUDA and torch is not None:
            return torch.cuda.current_stream(self._device[1]).cuda_stream
        return None

    def __enter__(self) -> "LayerCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"device={self._device}"
        return f"LayerCache({self._config}, {state})"


def _first(first) -> int:
    """``first`` as an int; the library checks its range and names it."""
    return _args.integer(first, "first", -(2**63), 2**63 - 1)


def _stream(stream):
    """An explicit stream: an int (a cudaStream_t) or None."""
    return None if stream is None else _args.integer(stream, "stream", 0, 2**64 - 1)
