"""A float64 numpy reference of the whole SALS algorithm, written from the specification
(shared SALS.md and sals.h comments), independent of the C code.

Shapes follow sals.h: keys/values [B, T, Hkv, d], queries [B, T, Hq, d], positions [B, T],
Dk = Hkv * d, projection U [Dk, r]. Storage rounding (float16 / bfloat16 / float32) is modelled
so that tolerances in the tests only have to cover arithmetic order, not storage.
"""

from __future__ import annotations

import math

import numpy as np


# ---- storage rounding ------------------------------------------------------------------------

def round_to(x, dtype: str) -> np.ndarray:
    """Values of x after a round trip through `dtype` storage, as float64."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x
    if dtype == "float32":
        return x.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(dtype)


# ---- stateless stages ------------------------------------------------------------------------

def rope(x, pos, inv_freq, attention_scaling=1.0, interleaved=False):
    """Rotate x [..., H, d] at pos [...] (one position per leading index).
    theta = pos * inv_freq is formed in float32, as sals.h specifies."""
    x = np.asarray(x, dtype=np.float64)
    inv_freq = np.asarray(inv_freq, dtype=np.float32)
    half = inv_freq.size
    if half == 0:
        return x.copy()
    theta = (np.asarray(pos).astype(np.float32)[..., None] * inv_freq).astype(np.float64)
    c = attention_scaling * np.cos(theta)[..., None, :]
    s = attention_scaling * np.sin(theta)[..., None, :]
    out = x.copy()
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = a * c - b * s
        out[..., 1:2 * half:2] = b * c + a * s
    else:
        a, b = x[..., :half], x[..., half:2 * half]
        out[..., :half] = a * c - b * s
        out[..., half:2 * half] = b * c + a * s
    return out


def _f16_directed(x, direction):
    """x rounded to a float16 value, down (direction < 0) or up (> 0), as float64."""
    h = np.asarray(x, np.float64).astype(np.float16)
    wrong = (h.astype(np.float64) > x) if direction < 0 else (h.astype(np.float64) < x)
    toward = np.float16(-np.inf) if direction < 0 else np.float16(np.inf)
    return np.where(wrong, np.nextafter(h, toward), h).astype(np.float64)


def quantize(v, bits, group):
    """KIVI-style asymmetric group quantisation of rows v [N, D] along channels.
    Returns (codes int [N, D], scale [N, D/group], zero [N, D/group]) as stored: zero is the
    group minimum rounded down to float16 and scale = (max - zero) / (2^bits - 1) rounded up to
    float16, so [zero, zero + levels * scale] covers the group and every element is within
    scale/2 of its code; codes round to nearest."""
    v = np.asarray(v, dtype=np.float64)
    n, d = v.shape
    g = v.reshape(n, d // group, group)
    levels = (1 << bits) - 1
    zero = _f16_directed(g.min(axis=2), -1)
    scale = _f16_directed((g.max(axis=2) - zero) / levels, +1)
    safe = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.floor((g - zero[..., None]) / safe[..., None] + 0.5), 0, levels)
    codes = np.where(scale[..., None] > 0, codes, 0)
    return codes.reshape(n, d).astype(np.int64), scale, zero


def dequantize(codes, scale, zero, group):
    n, d = codes.shape
    g = codes.reshape(n, d // group, group).astype(np.float64)
    return (zero[..., None] + g * scale[..., None]).reshape(n, d)


def pack(codes, bits):
    """Pack codes [N, D] little-endian within bytes (first channel in the low bits)."""
    n, d = codes.shape
    per = 8 // bits
    c = codes.reshape(n, d // per, per).astype(np.uint16)
    shifts = (np.arange(per) * bits).astype(np.uint16)
    return (c << shifts).sum(axis=2).astype(np.uint8)


def attention(q, keys, values, scale):
    """Softmax attention of q [Hq, d] over keys/values [N, Hkv, d] (GQA: head i uses KV head
    i // (Hq / Hkv)). An empty key set gives zeros."""
    hq, d = q.shape
    if keys.shape[0] == 0:
        return np.zeros((hq, d))
    g = hq // keys.shape[1]
    kv = np.arange(hq) // g
    logits = np.einsum("hd,nhd->hn", q, keys[:, kv, :]) * scale
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return np.einsum("hn,nhd->hd", p, values[:, kv, :])


def dense_attention(q, k, v, q_pos, k_pos, inv_freq, scale=None, attention_scaling=1.0,
                    interleaved=False):
    """Plain causal attention of one sequence: q [T, Hq, d], k/v [S, Hkv, d] pre-RoPE,
    positions q_pos [T], k_pos [S]; keys with k_pos <= q_pos are visible."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qr = rope(q, q_pos, inv_freq, attention_scaling, interleaved)
    kr = rope(k, k_pos, inv_freq, attention_scaling, interleaved)
    out = np.zeros(q.shape)
    for t in range(q.shape[0]):
        vis = np.asarray(k_pos) <= q_pos[t]
        out[t] = attention(qr[t], kr[vis], np.asarray(v, np.float64)[vis], scale)
    return out


# ---- the cache -------------------------------------------------------------------------------

class ReferenceCache:
    """The SALS cache of one layer for B sequences, in float64 with storage rounding.

    Settings mirror sals.Config (rank = projection columns). Per token it keeps what the C
    cache keeps: the latent key (rounded to `dtype`, or with key_bits < 16 its leading
    score_rank coordinates and the others each quantised in groups of key_group), the value
    (rounded to `dtype`, or quantised), and exact pre-RoPE key and value (rounded to `dtype`)
    used for sinks and the recent window (``exact_windows``; without them, as paged storage
    keeps tokens, sinks and recent tokens are attended rebuilt and dequantised like the others).
    """

    def __init__(self, n_head_q, n_head_kv, head_dim, proj, inv_freq, *, score_rank, value_bits=16,
                 value_group=32, key_bits=16, key_group=32, n_sink=16, n_recent=64,
                 budget_frac=0.125, budget_tokens=0, select_per_head=False, dense=False,
                 dtype="float32", scale=None, attention_scaling=1.0, interleaved=False, batch=1,
                 exact_windows=True):
        self.hq, self.hkv, self.d = n_head_q, n_head_kv, head_dim
        self.proj = np.asarray(proj, np.float64)
        self.rank = self.proj.shape[1]
        self.score_rank = score_rank
        self.bits, self.group = value_bits, value_group
        self.key_bits, self.key_group = key_bits, key_group
        self.n_sink, self.n_recent = n_sink, n_recent
        self.budget_frac, self.budget_tokens = budget_frac, budget_tokens
        self.per_head, self.dense = select_per_head, dense
        self.dtype = dtype
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.inv_freq = np.asarray(inv_freq, np.float32)
        self.attention_scaling, self.interleaved = attention_scaling, interleaved
        # paged storage keeps no exact copies: sinks and recent tokens are rebuilt too
        self.exact_windows = exact_windows
        self.seqs = [dict(pos=[], lat=[], val=[], k=[], v=[]) for _ in range(batch)]

    # The projection the cache uses is float32 (sals.h: copied as float32).
    @property
    def u(self):
        return round_to(self.proj, "float32")

    def append(self, k, v, pos):
        """k, v [B, T, Hkv, d], pos [B, T]; pos < 0 is padding."""
        k = np.asarray(k, np.float64)
        v = np.asarray(v, np.float64)
        dk = self.hkv * self.d
        for b in range(k.shape[0]):
            s = self.seqs[b]
            for t in range(k.shape[1]):
                if pos[b, t] < 0:
                    continue
                kf, vf = k[b, t].reshape(dk), v[b, t].reshape(dk)
                s["pos"].append(int(pos[b, t]))
                s["lat"].append(self.stored_latent(kf @ self.u))
                if self.bits == 16:
                    s["val"].append(round_to(vf, self.dtype))
                else:
                    codes, sc, zr = quantize(vf[None], self.bits, self.group)
                    s["val"].append(dequantize(codes, sc, zr, self.group)[0])
                s["k"].append(round_to(kf, self.dtype))
                s["v"].append(round_to(vf, self.dtype))

    def stored_latent(self, lat):
        """A latent key [rank] as the cache gives it back: rounded to `dtype`, or each part
        (coordinates below score_rank, and the others) quantised and dequantised."""
        if self.key_bits == 16:
            return round_to(lat, self.dtype)
        parts = [lat[:self.score_rank], lat[self.score_rank:]]
        return np.concatenate([
            dequantize(*quantize(p[None], self.key_bits, self.key_group), self.key_group)[0]
            if p.size else p for p in parts])

    def lengths(self):
        return np.array([len(s["pos"]) for s in self.seqs], np.int32)

    def budget(self, length, n_cand):
        want = self.budget_tokens if self.budget_tokens > 0 else math.ceil(
            np.float32(self.budget_frac) * length)
        return max(0, min(int(want), n_cand))

    def scores(self, b, q):
        """Selection scores of sequence b for the pre-RoPE query q [Hq, d]:
        ([H, n_cand] scores, candidate slot indices), H = 1 shared or Hkv per head."""
        s = self.seqs[b]
        length = len(s["pos"])
        cand = np.arange(self.n_sink, max(self.n_sink, length - self.n_recent))
        g = self.hq // self.hkv
        folded = np.asarray(q, np.float64).reshape(self.hkv, g, self.d).sum(axis=1)  # [Hkv, d]
        lat = np.array(s["lat"]).reshape(length, self.rank)[cand][:, :self.score_rank]
        if self.per_head:
            u = self.u.reshape(self.hkv, self.d, self.rank)
            q_lat = np.einsum("hd,hdr->hr", folded, u)
        else:
            q_lat = (folded.reshape(-1) @ self.u)[None]
        return q_lat[:, :self.score_rank] @ lat.T, cand

    def select(self, b, q):
        """Reference selection: per selection head, the set of top-`budget` candidate slots."""
        sc, cand = self.scores(b, q)
        n = self.budget(len(self.seqs[b]["pos"]), cand.size)
        return [set(cand[np.argsort(-row, kind="stable")[:n]].tolist()) for row in sc]

    def attend(self, q, q_pos, selection=None):
        """q [B, T, Hq, d] pre-RoPE, q_pos [B, T] -> out [B, T, Hq, d].
        `selection` (list over b of lists over heads of slot sets) replaces the reference's
        own top-k in sparse steps, so that outputs can be checked for a given selection."""
        q = np.asarray(q, np.float64)
        bsz, t_len = q.shape[:2]
        out = np.zeros(q.shape)
        sparse = t_len == 1 and not self.dense
        for b in range(bsz):
            s = self.seqs[b]
            length = len(s["pos"])
            if length == 0:
                continue
            pos = np.array(s["pos"])
            slot = np.arange(length)
            exact = (slot < self.n_sink) | (slot >= length - self.n_recent)
            stored = exact & self.exact_windows
            lat = np.array(s["lat"]).reshape(length, self.rank)
            keys = np.where(stored[:, None], np.array(s["k"]), lat @ self.u.T).reshape(
                length, self.hkv, self.d)
            vals = np.where(stored[:, None], np.array(s["v"]), np.array(s["val"])).reshape(
                length, self.hkv, self.d)
            keys = rope(keys, pos, self.inv_freq, self.attention_scaling, self.interleaved)
            for t in range(t_len):
                if q_pos[b, t] < 0:
                    continue
                qr = rope(q[b, t][None], np.array([q_pos[b, t]]), self.inv_freq,
                          self.attention_scaling, self.interleaved)[0]
                visible = pos <= q_pos[b, t]
                if not sparse:
                    out[b, t] = attention(qr, keys[visible], vals[visible], self.scale)
                    continue
                sel = selection[b] if selection is not None else self.select(b, q[b, t])
                g = self.hq // self.hkv
                for h, chosen in enumerate(sel):
                    mask = exact.copy()
                    mask[list(chosen)] = True
                    mask &= visible
                    heads = slice(None) if len(sel) == 1 else slice(h * g, (h + 1) * g)
                    kv = slice(None) if len(sel) == 1 else slice(h, h + 1)
                    out[b, t, heads] = attention(qr[heads], keys[mask][:, kv], vals[mask][:, kv],
                                                 self.scale)
        return out


def check_topk(selected, scores, cand, k, tol):
    """Whether `selected` (a set of slots) is a valid top-k of `scores` over `cand`, allowing
    ties within `tol`: it has k distinct candidates, and none scores below the k-th best minus
    tol. Returns an error message or "" (so a failure says what is wrong)."""
    selected = set(int(x) for x in selected)
    if len(selected) != k:
        return f"selected {len(selected)} tokens, expected {k}"
    lookup = dict(zip(cand.tolist(), scores.tolist()))
    if not selected <= lookup.keys():
        return f"selected non-candidates {sorted(selected - lookup.keys())[:5]}"
    if k == 0:
        return ""
    kth = np.sort(scores)[::-1][k - 1]
    worst = min(lookup[j] for j in selected)
    if worst < kth - tol:
        return f"a selected token scores {worst:.6g}, below the k-th best {kth:.6g} - {tol:.3g}"
    return ""
