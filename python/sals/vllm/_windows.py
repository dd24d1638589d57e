"""Which rows of the window stores hold exact copies of which tokens.

Paged storage keeps every token compressed in its slot; the exact pre-RoPE keys and values of
each sequence's sinks and recent window live in a window store per layer (``window`` of
sals_paged_append / sals_paged_attend), whose rows this module hands out once per step for all
layers (every layer stores the same tokens in the same slots). A row is keyed by the slot it
copies, so it stays right whatever vLLM does with blocks:

  - every append of a slot either (re)writes the slot's row or, when the token needs no copy,
    forgets the row, so a row always holds its slot's current token;
  - blocks shared by prefix caching hold the same tokens for every sequence, and so do rows;
  - a preempted request is recomputed into the slots vLLM gives it again, rewriting them.

A token's row is given up when the token leaves its sequence's recent window (sinks keep
theirs). The stores have a fixed number of rows: ``max_num_seqs * (n_sink + n_recent)`` hold
the windows of every sequence vLLM runs at once when each is scheduled every step; when they
are full the least recently used row the current step does not read is taken (those of
finished sequences, or of sequences the step left out), and a token whose copy is gone is
rebuilt from its slot, as every token outside the windows is. vLLM keeps no request identity in
the attention metadata, hence the slot keys and the recency rule.
"""

from __future__ import annotations

import numpy as np


class WindowRows:
    """Row bookkeeping of ``capacity`` rows for windows of ``n_sink`` + ``n_recent`` tokens."""

    def __init__(self, capacity: int, n_sink: int, n_recent: int):
        self.capacity = int(capacity)
        self.n_sink, self.n_recent = int(n_sink), int(n_recent)
        self._row_of: dict[int, int] = {}            # slot -> row
        self._slot_of = np.full(self.capacity, -1, np.int64)
        self._used = np.full(self.capacity, -1, np.int64)  # step of last use, -1 free
        self._step = 0

    def step(self, query_start: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
             slot_mapping: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows for one forward step: ``(append_rows [N], window_rows [B, n_sink + n_recent])``
        (int32, -1 for none), in the layout sals_paged_append / sals_paged_attend read.
        ``query_start`` [B + 1], ``seq_lens`` [B] (after this step's tokens), ``block_table``
        [B, max_blocks], ``slot_mapping`` [N]: vLLM's metadata of the step."""
        self._step += 1
        width = self.n_sink + self.n_recent
        n = len(slot_mapping)
        append_rows = np.full(n, -1, np.int32)
        window_rows = np.full((len(seq_lens), width), -1, np.int32)
        needed = []  # (batch row, window column, slot, appended token index or -1)
        leaving = []  # slots of tokens this step moves out of their sequence's recent window

        def slot_of(b: int, t: int) -> int:
            return int(block_table[b, t // block_size]) * block_size + t % block_size

        for b, s in enumerate(seq_lens.tolist()):
            q0, q1 = int(query_start[b]), int(query_start[b + 1])
            first_new = s - (q1 - q0)
            ns = min(s, self.n_sink)
            recent = max(ns, s - self.n_recent)
            for t in list(range(ns)) + list(range(recent, s)):
                col = t if t < ns else width - s + t
                needed.append((b, col, slot_of(b, t),
                               q0 + t - first_new if t >= first_new else -1))
            leaving += [slot_of(b, t) for t in range(max(self.n_sink, first_new - self.n_recent),
                                                      min(recent, first_new))]
        # Appended tokens that need no copy (outside every window at append) drop their slot's
        # row: the slot now holds another token than the one copied there.
        fresh = {slot for _, _, slot, i in needed if i >= 0}
        for i in range(n):
            slot = int(slot_mapping[i])
            if slot >= 0 and slot not in fresh:
                self._drop(slot)
        # Rows this step keeps: every copy it reads. Tokens that left their window give their
        # rows up (unless another sequence reads them now: a block shared by prefix caching).
        for _b, _col, slot, _i in needed:
            row = self._row_of.get(slot)
            if row is not None:
                self._used[row] = self._step
        for slot in leaving:
            row = self._row_of.get(slot)
            if row is not None and self._used[row] != self._step:
                self._drop(slot)
        # Then rows for the tokens it appends.
        for b, col, slot, i in needed:
            row = self._row_of.get(slot)
            if row is None and i >= 0:
                row = self._take(slot)
            if row is None:
                continue  # copy given up (or never made): the token is rebuilt
            window_rows[b, col] = row
            if i >= 0:
                append_rows[i] = row
        return append_rows, window_rows

    def _drop(self, slot: int) -> None:
        row = self._row_of.pop(slot, None)
        if row is not None:
            self._slot_of[row] = -1
            self._used[row] = -1

    def _take(self, slot: int) -> int | None:
        """A row for ``slot``: a free one, else the least recently used row this step does not
        use; None when every row serves this step."""
        if self.capacity == 0:
            return None
        row = int(np.argmin(self._used))
        if self._used[row] == self._step:
            return None
        if self._slot_of[row] >= 0:
            del self._row_of[int(self._slot_of[row])]
        self._slot_of[row] = slot
        self._used[row] = self._step
        self._row_of[slot] = row
        return row
