"""sals.torch_ops: the SALS cache operators registered with torch (torch.ops.sals), their fake
implementations, torch.compile tracing without graph breaks, and results equal to the eager
LayerCache calls. CPU here; the CUDA variants run where a GPU is present."""

import numpy as np
import pytest

import sals

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("sals.torch_ops")

HQ, HKV, D, S = 4, 2, 16, 40
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and sals.cuda_available() else [])


def _cache(device, seed=0):
    rng = np.random.default_rng(seed)
    cfg = sals.Config(HQ, HKV, D, rank=HKV * D // 2, n_sink=2, n_recent=4, budget_frac=0.25,
                      max_tokens=S + 8, dtype="float32")
    proj = np.linalg.qr(rng.standard_normal((HKV * D, HKV * D)))[0][:, :cfg.resolved_rank()]
    return sals.LayerCache(cfg, sals.Rope.default(D), proj.astype(np.float32), device=device)


def _inputs(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, S + 1, HKV, D, generator=g)
    v = torch.randn(1, S + 1, HKV, D, generator=g)
    q = torch.randn(1, 1, HQ, D, generator=g)
    pos = torch.arange(S + 1, dtype=torch.int32)[None]
    return [x.to(device) for x in (k, v, q, pos)]


@pytest.mark.parametrize("device", DEVICES)
def test_operators_equal_the_eager_cache(device):
    k, v, q, pos = _inputs(device)
    eager, op = _cache(device), _cache(device)
    eager.append(k, v, pos)
    want = eager.attend(q, pos[:, S:])
    h, order = torch_ops.handle(op), torch_ops.order_tensor(device)
    torch.ops.sals.cache_append(k, v, pos, order, h)
    got = torch.ops.sals.cache_attend(q, pos[:, S:], order, h)
    assert got.device == q.device and got.shape == q.shape
    assert torch.equal(got, want)
    assert torch_ops.handle(op) is h  # stable


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_a_decode_step_without_graph_breaks(device):
    k, v, q, pos = _inputs(device)
    eager, op = _cache(device), _cache(device)
    eager.append(k[:, :S], v[:, :S], pos[:, :S])
    op.append(k[:, :S], v[:, :S], pos[:, :S])
    h, order = torch_ops.handle(op), torch_ops.order_tensor(device)

    def step(k1, v1, q1, p1):
        torch.ops.sals.cache_append(k1 * 1.0, v1, p1, order, h)
        return torch.ops.sals.cache_attend(q1 + 0.0, p1, order, h) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(k[:, S:], v[:, S:], q, pos[:, S:])
    eager.append(k[:, S:], v[:, S:], pos[:, S:])
    want = eager.attend(q, pos[:, S:]) * 2.0
    assert torch.allclose(got, want, rtol=0, atol=0)
    # the append ran exactly once, before the attend
    assert eager.lengths().tolist() == op.lengths().tolist() == [S + 1]


class _Layer:
    """What sals.hf.SalsLayer hands the operators: its cache's handle and order tensor."""

    def __init__(self, cache, device):
        self.handle, self.order = torch_ops.handle(cache), torch_ops.order_tensor(device)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_compiles_once_for_any_number_of_caches(device):
    """The handle is a tensor, not an int that dynamo guards on: one compiled step serves more
    caches than the recompile limit (8) with fullgraph=True, without recompiling, and gives
    each cache's eager result."""
    from torch._dynamo.utils import counters

    def step(layer, k1, v1, q1, p1):
        torch.ops.sals.cache_append(k1, v1, p1, layer.order, layer.handle)
        return torch.ops.sals.cache_attend(q1, p1[:, -1:], layer.order, layer.handle)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(10):
            k, v, q, pos = _inputs(device, seed=seed)
            eager, op = _cache(device, seed=seed), _cache(device, seed=seed)
            eager.append(k, v, pos)
            want = eager.attend(q, pos[:, S:])
            got = compiled(_Layer(op, device), k, v, q, pos)
            # CUDA: the selected entries are attended in the order top-k wrote them, which
            # varies from run to run, so sums differ at rounding level; the CPU is exact
            torch.testing.assert_close(got, want, rtol=0, atol=0 if device == "cpu" else 1e-6,
                                       msg=lambda m: f"cache {seed}: {m}")
            assert op.lengths().tolist() == [S + 1]
    assert counters["stats"]["unique_graphs"] == 1


def test_fake_implementations_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cache = _cache("cpu")
    h, order = torch_ops.handle(cache), torch_ops.order_tensor("cpu")
    with FakeTensorMode() as mode:
        q = torch.empty(3, 1, HQ, D, dtype=torch.float16)
        k = torch.empty(3, 1, HKV, D)
        pos = torch.empty(3, 1, dtype=torch.int32)
        o, fake_h = mode.from_tensor(order), mode.from_tensor(h)
        torch.ops.sals.cache_append(k, k, pos, o, fake_h)
        out = torch.ops.sals.cache_attend(q, pos, o, fake_h)
        assert out.shape == q.shape and out.dtype == torch.float16
    assert cache.lengths().tolist() == [0]  # nothing ran


def test_schema_declares_what_the_operators_mutate():
    for name in ("cache_append", "cache_attend"):
        schema = getattr(torch.ops.sals, name).default._schema
        mutated = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
        assert mutated == ["order"], (name, mutated)


def test_opcheck():
    cache = _cache("cpu")
    k, v, q, pos = _inputs("cpu")
    cache.append(k[:, :S], v[:, :S], pos[:, :S])
    h, order = torch_ops.handle(cache), torch_ops.order_tensor("cpu")
    torch.library.opcheck(torch.ops.sals.cache_attend, (q, pos[:, S:], order, h),
                          test_utils=("test_schema", "test_faketensor"))


def test_a_dead_or_malformed_handle_is_refused():
    cache = _cache("cpu")
    h = torch_ops.handle(cache)
    _, _, q, pos = _inputs("cpu")
    order = torch_ops.order_tensor("cpu")
    for bad in [h.int(), h.float(), torch.cat([h, h])] + [h.to(d) for d in DEVICES[1:]]:
        with pytest.raises(sals.InvalidArgumentError, match="^cache: expected a handle"):
            torch.ops.sals.cache_attend(q, pos[:, S:], order, bad)
    del cache
    import gc

    gc.collect()
    with pytest.raises(sals.InvalidArgumentError, match=f"handle {int(h)} names no live"):
        torch.ops.sals.cache_attend(q, pos[:, S:], order, h)
    with pytest.raises(sals.InvalidArgumentError, match="cache: expected sals.LayerCache"):
        torch_ops.handle("not a cache")
