"""sals.vllm._windows without vLLM: the window-store rows handed out per step, against a model
of what vLLM does with blocks (new sequences, decode steps, chunked prefill, prefix sharing,
freed and reused blocks, eviction when the rows run out)."""

from __future__ import annotations

import numpy as np
import pytest

from sals.vllm._windows import WindowRows

BS = 4          # block size
N_SINK, N_RECENT = 2, 3
WIDTH = N_SINK + N_RECENT


class Engine:
    """Sequences over a pool of blocks, and a window store that records which token each row
    holds (sequence's token identity, as sals_paged_append would copy it)."""

    def __init__(self, capacity, n_blocks=64):
        self.rows = WindowRows(capacity, N_SINK, N_RECENT)
        self.free = list(range(n_blocks))[::-1]
        self.tables: dict[str, list] = {}
        self.tokens: dict[str, list] = {}   # token identities per sequence
        self.shared: dict[str, int] = {}    # tokens a sequence found in another's blocks
        self.store = {}                     # row -> token identity

    def add(self, name, tokens, shared_from=None, shared_blocks=0):
        table = list(self.tables[shared_from][:shared_blocks]) if shared_from else []
        self.tables[name], self.tokens[name] = table, list(tokens)
        self.shared[name] = len(table) * BS
        return len(table) * BS  # tokens already stored (prefix-cache hit)

    def finish(self, name):
        """The sequence leaves; its blocks no other sequence holds go back to the pool (vLLM
        counts references to blocks shared by prefix caching)."""
        table = self.tables.pop(name)
        del self.tokens[name]
        held = {b for t in self.tables.values() for b in t}
        self.free.extend(b for b in table[::-1] if b not in held)

    def step(self, work: dict):
        """One forward step: work = {sequence: (first new token, new token count)}."""
        names = list(work)
        qs, lens, slots, ids = [0], [], [], []
        for name in names:
            start, n = work[name]
            table = self.tables[name]
            while len(table) * BS < start + n:
                table.append(self.free.pop())
            for t in range(start, start + n):
                slots.append(table[t // BS] * BS + t % BS)
                ids.append(self.tokens[name][t])
            qs.append(qs[-1] + n)
            lens.append(start + n)
        width = max(len(self.tables[n]) for n in names)
        table = np.array([self.tables[n] + [0] * (width - len(self.tables[n])) for n in names],
                         np.int32)
        append_rows, window_rows = self.rows.step(np.array(qs), np.array(lens), table,
                                                  np.array(slots, np.int32), BS)
        for i, row in enumerate(append_rows):  # what sals_paged_append copies
            if row >= 0:
                self.store[int(row)] = ids[i]
        return {n: (window_rows[b], lens[b]) for b, n in enumerate(names)}

    def check(self, result, complete=True):
        """Every row a sequence reads holds its token; with `complete`, every window token it
        appended itself has a row (tokens of blocks it shares got one only if they were in the
        first owner's windows then)."""
        for name, (rows, s) in result.items():
            ns = min(s, N_SINK)
            window = list(range(ns)) + list(range(max(ns, s - N_RECENT), s))
            for t in window:
                col = t if t < ns else WIDTH - s + t
                row = int(rows[col])
                if row >= 0:
                    assert self.store[row] == self.tokens[name][t], (name, t)
                else:
                    assert not complete or t < self.shared[name], f"{name}: token {t} has no row"
            others = set(range(WIDTH)) - {t if t < ns else WIDTH - s + t for t in window}
            assert all(rows[c] == -1 for c in others)


def test_decode_and_chunked_prefill_keep_every_window_token():
    e = Engine(capacity=3 * WIDTH)
    e.add("a", range(100, 130))
    e.add("b", range(200, 230))
    # a: a 10-token chunk then one of 7; b: 3 tokens at a time; then both decode
    e.check(e.step({"a": (0, 10), "b": (0, 3)}))
    e.check(e.step({"a": (10, 7), "b": (3, 3)}))
    for t in range(17, 25):
        e.check(e.step({"a": (t, 1), "b": (t - 11, 1)}))


def test_prefix_sharing_and_reused_blocks():
    """A sequence that starts from another's full blocks reads their copies; blocks freed and
    given to a new sequence get copies of the new tokens, never the old ones."""
    e = Engine(capacity=4 * WIDTH)
    e.add("a", range(100, 140))
    e.check(e.step({"a": (0, 12)}))
    start = e.add("b", list(range(100, 108)) + list(range(300, 320)), shared_from="a",
                  shared_blocks=2)
    e.check(e.step({"a": (12, 1), "b": (start, 4)}))
    e.finish("a")  # its blocks back to the pool, copies left behind
    e.add("c", range(500, 540))
    for t in range(0, 20, 5):
        e.check(e.step({"b": (start + 4 + t // 5, 1), "c": (t, 5)}))


def test_rows_run_out_gracefully():
    """Fewer rows than windows: the tokens without one are rebuilt (no row), never read from a
    row that holds another token; rows of sequences that left are taken first."""
    e = Engine(capacity=WIDTH + 2)
    for name, base in (("a", 100), ("b", 200)):
        e.add(name, range(base, base + 40))
    e.check(e.step({"a": (0, 6)}))
    result = e.step({"a": (6, 1), "b": (0, 6)})
    e.check(result, complete=False)
    assert (result["b"][0] >= 0).sum() < WIDTH  # some of b's window went without rows
    e.finish("a")
    e.add("c", range(300, 340))
    for t in range(3):
        e.check(e.step({"b": (6 + t, 1), "c": (t * 2, 2)}), complete=False)


def test_no_rows_means_no_copies():
    rows = WindowRows(0, N_SINK, N_RECENT)
    append_rows, window_rows = rows.step(np.array([0, 3]), np.array([3]),
                                         np.array([[0]], np.int32), np.array([0, 1, 2], np.int32),
                                         BS)
    assert (append_rows == -1).all() and (window_rows == -1).all()


def _random_schedule(seed: int, capacity: int, skip: float):
    """Random arrivals (half of them sharing another's first two blocks), chunk sizes and
    finishes; each step leaves a sequence out with probability `skip`. Yields each step's
    result with the engine."""
    rng = np.random.default_rng(seed)
    e = Engine(capacity=capacity, n_blocks=200)
    pos, serial = {}, 0
    for _ in range(80):
        if len(pos) < 5 and rng.random() < 0.4:
            name = f"s{serial}"
            serial += 1
            donor = next((n for n in pos if pos[n] >= 2 * BS), None) if rng.random() < 0.5 \
                else None
            if donor is not None:
                tokens = e.tokens[donor][:2 * BS] + list(range(serial * 1000, serial * 1000 + 50))
                pos[name] = e.add(name, tokens, shared_from=donor, shared_blocks=2)
            else:
                pos[name] = e.add(name, range(serial * 1000, serial * 1000 + 60))
        work = {}
        for name in pos:
            n = min(int(rng.integers(1, 6)), len(e.tokens[name]) - pos[name])
            if n > 0 and rng.random() >= skip:
                work[name] = (pos[name], n)
                pos[name] += n
        if work:
            yield e, e.step(work)
        for name in [n for n in pos if rng.random() < 0.1 or pos[n] == len(e.tokens[n])]:
            e.finish(name)
            del pos[name]


@pytest.mark.parametrize("seed", range(5))
def test_every_sequence_every_step_fits_the_capacity(seed):
    """Sequences scheduled every step (decode-bound serving): max_num_seqs * window rows keep
    every window token each sequence appended itself."""
    for e, result in _random_schedule(seed, capacity=5 * WIDTH, skip=0.0):
        e.check(result)


@pytest.mark.parametrize("seed", range(5))
def test_left_out_sequences_lose_copies_never_correctness(seed):
    """Steps that leave sequences out, and too few rows: some window tokens go without a copy,
    but no row read ever holds another token than its slot's."""
    for e, result in _random_schedule(seed, capacity=3 * WIDTH, skip=0.3):
        e.check(result, complete=False)
