"""Property-based bad input for the torch operators ``torch.ops.sals.cache_append`` and
``cache_attend`` (sals.torch_ops), in the manner of test_fuzz_inputs.py.

Each example runs a few random steps (append or attend, small random sizes, zero included,
random padding: positions < 0) against three caches of one random config: ``ops`` through the
operators, ``eager`` through ``LayerCache.append/attend`` with every call, ``ref`` through the
methods with the valid calls only. Each step breaks up to two of its arguments with a random
mutation: a wrong dtype, ndim or shape, a non-contiguous last dimension, NaN or infinity,
values beyond int32, None, a numpy array, and for the cache handle a dead, closed, malformed or
unknown one. Some mutations keep the call valid (float16, bfloat16, rows further apart,
transposed batch and time, broadcast inputs, int64 positions, requires_grad, a 0-d handle).
The property: a valid call does what the method does (identical output, identical lengths),
an invalid one raises one of sals's own errors naming a broken argument (a value that is no
tensor at all is refused by torch's dispatcher, naming the argument, before sals runs) and
changes nothing: the operator cache's lengths stay, and at the end it attends exactly as the
cache that never saw the invalid calls.

Examples: SALS_FUZZ_EXAMPLES (default 100; a few seconds on two cores), derandomized.
"""

from __future__ import annotations

import functools
import gc
import re

import numpy as np
import pytest

pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
import sals
from hypothesis import event, given
from hypothesis import strategies as st
from fuzz import FUZZ

torch_ops = pytest.importorskip("sals.torch_ops")


HQ, HKV, D = 4, 2, 8
DK = HKV * D
MAX_BATCH, MAX_TOKENS = 2, 8
PROJ = np.linalg.qr(np.random.default_rng(0).standard_normal((DK, DK)))[0].astype(np.float32)

FLOAT_MUTATIONS = ["ok_f16", "ok_bf16", "ok_padded_rows", "ok_transposed", "ok_broadcast",
                   "ok_grad", "bad_f64", "bad_int", "bad_complex", "bad_bool", "bad_ndim_plus",
                   "bad_ndim_minus", "bad_shape", "bad_last_stride", "bad_nan", "bad_inf",
                   "bad_none", "bad_numpy"]
INDEX_MUTATIONS = ["ok_int64", "ok_padded_rows", "bad_float", "bad_bool", "bad_range",
                   "bad_ndim_plus", "bad_ndim_minus", "bad_shape", "bad_last_stride", "bad_none",
                   "bad_list"]
HANDLE_MUTATIONS = ["ok_0d", "ok_2d", "bad_int32", "bad_float", "bad_two", "bad_empty",
                    "bad_dead", "bad_closed", "bad_unknown", "bad_none", "bad_int"]


def make_cache(storage: str, sparse: bool) -> sals.LayerCache:
    if sparse:
        cfg = sals.Config(HQ, HKV, D, rank=DK // 2, n_sink=1, n_recent=2, budget_frac=0.5,
                          max_tokens=MAX_TOKENS, max_batch=MAX_BATCH, dtype=storage)
        proj = np.ascontiguousarray(PROJ[:, :DK // 2])
    else:
        cfg = sals.Config.preset("dense-equivalent", HQ, HKV, D, dtype=storage,
                                 max_tokens=MAX_TOKENS, max_batch=MAX_BATCH, n_sink=1, n_recent=2)
        proj = PROJ
    return sals.LayerCache(cfg, sals.Rope.default(D), proj)


def dead_handle() -> torch.Tensor:
    cache = make_cache("float32", False)
    h = torch_ops.handle(cache)
    del cache
    gc.collect()
    return h


def padded_rows(x: torch.Tensor):
    """The same values with rows (dim 0) further apart; valid unless dim 0 is the last one."""
    big = torch.zeros((x.shape[0] * 2,) + tuple(x.shape[1:]), dtype=x.dtype)
    big[::2] = x
    return big[::2], x.dim() > 1 or x.shape[0] <= 1


def mutate_float(x: torch.Tensor, kind: str, rows, draw):
    """(value, ok). ``rows``: [B, T] bool, True where the row is not padding (NaN there is
    refused; in padding, whether it is read is the library's business, so it is not tried)."""
    if kind == "ok_f16":
        return x.half(), True
    if kind == "ok_bf16":
        return x.bfloat16(), True
    if kind == "ok_padded_rows":
        return padded_rows(x)
    if kind == "ok_transposed":  # [T, B, ...] memory read as [B, T, ...]: last dim contiguous
        return x.transpose(0, 1).contiguous().transpose(0, 1), True
    if kind == "ok_broadcast":  # zero strides on B and T: read-only input, fine
        if x.numel() == 0:
            return x, True
        return x[:1, :1].expand(x.shape), True
    if kind == "ok_grad":
        return x.clone().requires_grad_(True), True
    if kind == "bad_f64":
        return x.double(), False
    if kind == "bad_int":
        return (x * 3).int(), False
    if kind == "bad_complex":
        return x.to(torch.complex64), False
    if kind == "bad_bool":
        return x > 0, False
    if kind == "bad_ndim_plus":
        return x[None], False
    if kind == "bad_ndim_minus":
        return x.reshape(-1), False
    if kind == "bad_shape":
        axis = draw(st.integers(0, 3))
        shape = list(x.shape)
        shape[axis] += 1
        return torch.zeros(shape), False
    if kind == "bad_last_stride":
        if x.numel() == 0:  # no element to read: no stride to refuse
            return x, True
        return x.repeat_interleave(2, dim=-1)[..., ::2], False
    if kind in ("bad_nan", "bad_inf"):
        live = rows.nonzero()
        if len(live) == 0:
            return x.double(), False
        b, t = (int(i) for i in live[draw(st.integers(0, len(live) - 1))])
        y = x.clone()
        y[b, t, draw(st.integers(0, x.shape[2] - 1)), draw(st.integers(0, D - 1))] = \
            float("nan") if kind == "bad_nan" else -float("inf")
        return y, False
    if kind == "bad_none":
        return None, False
    if kind == "bad_numpy":
        return x.numpy(), False
    raise AssertionError(kind)


def mutate_index(p: torch.Tensor, kind: str, draw):
    if kind == "ok_int64":
        return p.long(), True
    if kind == "ok_padded_rows":
        return padded_rows(p)
    if kind == "bad_float":
        return p.float() + 0.5, False
    if kind == "bad_bool":
        return p >= 0, False
    if kind == "bad_range":
        big = p.long().clone()
        if big.numel() == 0:
            return torch.tensor([[2**40]]), False
        big.view(-1)[draw(st.integers(0, big.numel() - 1))] = \
            draw(st.sampled_from([2**31, 2**40, -(2**31) - 1]))
        return big, False
    if kind == "bad_ndim_plus":
        return p[None], False
    if kind == "bad_ndim_minus":
        return p.reshape(-1), False
    if kind == "bad_shape":
        shape = list(p.shape)
        shape[draw(st.integers(0, 1))] += 1
        return torch.full(shape, -5, dtype=torch.int32), False
    if kind == "bad_last_stride":
        if p.shape[-1] < 2 or p.numel() == 0:
            return p, True
        return p.repeat_interleave(2, dim=-1)[..., ::2], False
    if kind == "bad_none":
        return None, False
    if kind == "bad_list":
        return p.tolist(), False
    raise AssertionError(kind)


def mutate_handle(h: torch.Tensor, kind: str):
    n = int(h)
    if kind == "ok_0d":
        return torch.tensor(n), True
    if kind == "ok_2d":
        return torch.tensor([[n]]), True
    if kind == "bad_int32":
        return h.int(), False
    if kind == "bad_float":
        return h.double(), False
    if kind == "bad_two":
        return torch.cat([h, h]), False
    if kind == "bad_empty":
        return h[:0], False
    if kind == "bad_dead":
        return dead_handle(), False
    if kind == "bad_closed":
        cache = make_cache("float32", False)
        cache.close()
        _keep.append(cache)  # alive but closed
        return torch_ops.handle(cache), False
    if kind == "bad_unknown":
        return torch.tensor([2**62]), False
    if kind == "bad_none":
        return None, False
    if kind == "bad_int":
        return n, False
    raise AssertionError(kind)


_keep: list = []


def positions(draw, b: int, t: int, start) -> torch.Tensor:
    """[B, T] int32: consecutive positions from start[i], some of them padding (< 0)."""
    p = torch.zeros((b, t), dtype=torch.int32)
    for i in range(b):
        for j in range(t):
            p[i, j] = start[i] + j
    if b * t and draw(st.booleans()):
        for _ in range(draw(st.integers(1, b * t))):
            i, j = draw(st.integers(0, b - 1)), draw(st.integers(0, t - 1))
            p[i, j] = draw(st.sampled_from([-1, -2, -(2**31)]))
    return p


def randn(draw, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(*shape, generator=g)


def expect_refused(call, bad, kinds, torch_level):
    """call() raises a sals error naming one of `bad`; a value that is no tensor at all is
    refused by torch's dispatcher first (`torch_level`), which names the argument as well."""
    with pytest.raises(Exception) as e:
        call()
    msg = str(e.value)
    if torch_level and isinstance(e.value, RuntimeError) and not isinstance(e.value,
                                                                             sals.SalsError):
        assert any(f"for argument '{n}'" in msg for n in torch_level), msg
        return e.value
    assert isinstance(e.value, sals.SalsError), f"{type(e.value).__name__}: {msg} ({kinds})"
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in bad), \
        f"error does not name any of {bad} ({kinds}): {type(e.value).__name__}: {msg}"
    return e.value


@FUZZ
@given(st.data())
def test_operators_equal_the_methods_and_refuse_bad_input(data):
    draw = data.draw
    storage = draw(st.sampled_from(["float32", "float16"]))
    sparse = draw(st.sampled_from([True, True, False]))
    ops, eager, ref = (make_cache(storage, sparse) for _ in range(3))
    h, order = torch_ops.handle(ops), torch_ops.order_tensor("cpu")
    reserved = [0] * MAX_BATCH  # slots each sequence has reserved (sals.h: T per append)
    n0 = draw(st.sampled_from([0, 3, 5, 6]))  # a valid prefill first: something to attend
    if n0:
        k0, v0 = randn(draw, MAX_BATCH, n0, HKV, D), randn(draw, MAX_BATCH, n0, HKV, D)
        p0 = positions(draw, MAX_BATCH, n0, [0] * MAX_BATCH)
        torch.ops.sals.cache_append(k0, v0, p0, order, h)
        eager.append(k0, v0, p0)
        ref.append(k0, v0, p0)
        reserved = [n0] * MAX_BATCH
    for _ in range(draw(st.integers(1, 4))):
        append = draw(st.booleans())
        b = draw(st.sampled_from([0, 1, 2, 2, 3]))
        lengths = ref.lengths().tolist()
        start = [lengths[i] if i < MAX_BATCH else 0 for i in range(b)]
        if append:
            t = draw(st.integers(0, 3))
            args = {"k": randn(draw, b, t, HKV, D), "v": randn(draw, b, t, HKV, D),
                    "positions": positions(draw, b, t, start)}
        else:
            t = draw(st.sampled_from([0, 1, 1, 2]))  # T = 1 on a sparse layer: a SALS step
            start = [max(s - 1, 0) + draw(st.integers(0, 2)) for s in start]
            args = {"q": randn(draw, b, t, HQ, D), "positions": positions(draw, b, t, start)}
        rows = args["positions"] >= 0
        names = list(args) + ["cache"]
        count = draw(st.sampled_from([0, 0, 1, 1, 2]))
        chosen = draw(st.lists(st.sampled_from(names), min_size=count, max_size=count,
                               unique=True))
        values, bad, kinds, torch_level = dict(args), [], {}, []
        handle_value = h
        for name in chosen:
            if name == "cache":
                kind = draw(st.sampled_from(HANDLE_MUTATIONS))
                handle_value, ok = mutate_handle(h, kind)
            elif name == "positions":
                kind = draw(st.sampled_from(INDEX_MUTATIONS))
                if kind == "bad_shape" and "bad_shape" in kinds.values():
                    kind = "bad_float"  # two changed shapes could agree again
                values[name], ok = mutate_index(args[name], kind, draw)
            else:
                kind = draw(st.sampled_from(FLOAT_MUTATIONS))
                if kind == "bad_shape" and "bad_shape" in kinds.values():
                    kind = "bad_f64"
                values[name], ok = mutate_float(args[name], kind, rows, draw)
            kinds[name] = kind
            if not ok:
                bad.append(name)
                if kind in ("bad_numpy", "bad_list", "bad_int"):
                    torch_level.append(name)
        ops_before = ops.lengths().tolist()
        if append:
            tensors = (values["k"], values["v"], values["positions"])
            call = functools.partial(torch.ops.sals.cache_append, *tensors, order, handle_value)
            method = functools.partial(sals.LayerCache.append, k=tensors[0], v=tensors[1],
                                       positions=tensors[2])
        else:
            tensors = (values["q"], values["positions"])
            call = functools.partial(torch.ops.sals.cache_attend, *tensors, order, handle_value)
            method = functools.partial(sals.LayerCache.attend, q=tensors[0], positions=tensors[1])
        over = b > MAX_BATCH or (append and any(reserved[i] + t > MAX_TOKENS for i in range(b)))
        if over:  # beyond the cache's capacity: refused (naming k or q), nothing stored
            bad = bad + ["k" if append else "q"]
            torch_level = torch_level if len(bad) > 1 else []
            kinds["capacity"] = (b, t, reserved)
        event(f"{'append' if append else 'attend'} {'refused' if bad else 'valid'}")
        if bad:
            err = expect_refused(call, bad, kinds, torch_level)
            assert ops.lengths().tolist() == ops_before, kinds  # nothing stored
            if not torch_level and "cache" not in bad:  # the method refuses it just as well
                with pytest.raises(type(err)):
                    method(eager)
            continue
        got = call()
        want_eager = method(eager)
        want = method(ref)
        if append:
            assert got is None
            for i in range(b):
                reserved[i] += t
        else:
            if t == 1 and sparse and max(ref.lengths().tolist()[:b] or [0]) > 3 and b:
                event("sparse decode step over candidates")
            assert got.shape == values["q"].shape and got.dtype == values["q"].dtype
            assert torch.equal(got, want) and torch.equal(want_eager, want)
        assert ops.lengths().tolist() == eager.lengths().tolist() == ref.lengths().tolist()
    # The failed calls changed nothing: the operator cache attends exactly as the reference.
    n = ref.lengths().tolist()
    q = randn(draw, MAX_BATCH, 1, HQ, D)
    qpos = torch.tensor([[max(x - 1, 0)] for x in n], dtype=torch.int32)
    got = torch.ops.sals.cache_attend(q, qpos, order, h)
    assert torch.equal(got, ref.attend(q, qpos)), (storage, sparse)
    assert torch.equal(torch.ops.sals.cache_attend(q, qpos, order, h), eager.attend(q, qpos))
    _keep.clear()


def test_handles_are_refused_wherever_they_are_passed():
    """None and a non-tensor for the handle or a tensor argument: a sals error naming it, or
    torch's own refusal naming it, never an AttributeError from inside the operator."""
    cache = make_cache("float32", False)
    h, order = torch_ops.handle(cache), torch_ops.order_tensor("cpu")
    k = torch.zeros(1, 1, HKV, D)
    p = torch.zeros(1, 1, dtype=torch.int32)
    q = torch.zeros(1, 1, HQ, D)
    cases = [
        (lambda: torch.ops.sals.cache_append(None, k, p, order, h), "k"),
        (lambda: torch.ops.sals.cache_append(k, None, p, order, h), "v"),
        (lambda: torch.ops.sals.cache_append(k, k, None, order, h), "positions"),
        (lambda: torch.ops.sals.cache_append(k, k, p, order, None), "cache"),
        (lambda: torch.ops.sals.cache_attend(None, p, order, h), "q"),
        (lambda: torch.ops.sals.cache_attend(q, None, order, h), "positions"),
        (lambda: torch.ops.sals.cache_attend(q, p, order, None), "cache"),
    ]
    for call, name in cases:
        with pytest.raises(sals.InvalidArgumentError, match=rf"^{name}: "):
            call()
    assert cache.lengths().tolist() == [0, 0]
