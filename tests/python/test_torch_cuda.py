"""The binding with torch CUDA tensors: outputs in torch on the input's device, the current
torch stream, and CUDA results equal to the CPU backend's. Skipped without a usable GPU."""

import numpy as np
import pytest

import sals

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and sals.cuda_available()),
                                reason="no CUDA device or CUDA build")

HQ, HKV, D, S = 8, 2, 64, 600


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    cfg = sals.Config.preset("sals-25", HQ, HKV, D, max_tokens=S + 1, dtype="float16")
    proj = np.linalg.qr(rng.standard_normal((HKV * D, HKV * D)))[0][:, :cfg.resolved_rank()]
    k = torch.from_numpy(rng.standard_normal((1, S + 1, HKV, D)).astype(np.float16))
    v = torch.from_numpy(rng.standard_normal((1, S + 1, HKV, D)).astype(np.float16))
    q = torch.from_numpy(rng.standard_normal((1, 1, HQ, D)).astype(np.float16))
    pos = torch.arange(S + 1, dtype=torch.int32)[None]
    return cfg, proj.astype(np.float32), k, v, q, pos


def _decode(cache, k, v, q, pos):
    cache.append(k[:, :S], v[:, :S], pos[:, :S])
    cache.append(k[:, S:], v[:, S:], pos[:, S:])
    return cache.attend(q, pos[:, S:])


def test_cuda_cache_equals_cpu_cache():
    cfg, proj, k, v, q, pos = _problem()
    rope = sals.Rope.default(D)
    cpu = sals.LayerCache(cfg, rope, proj)
    gpu = sals.LayerCache(cfg, rope, torch.from_numpy(proj).cuda(), device="cuda")
    want = _decode(cpu, k, v, q, pos)
    got = _decode(gpu, k.cuda(), v.cuda(), q.cuda(), pos.cuda())
    assert got.is_cuda and got.dtype == torch.float16 and got.shape == want.shape
    err = (got.cpu().float() - want.float()).abs().max().item()
    assert err <= 4e-3 * v.abs().max().item()
    np.testing.assert_array_equal(gpu.lengths(), cpu.lengths())
    (gi, gc), (ci, cc) = gpu.selected(), cpu.selected()
    np.testing.assert_array_equal(gc, cc)
    overlap = len(set(gi[0, 0].tolist()) & set(ci[0, 0].tolist())) / max(1, cc[0])
    assert overlap > 0.98  # identical up to near-ties of float16 scores
    mg, mc = gpu.memory(), cpu.memory()
    assert {f: mg[f] for f in mg if f != "allocated"} == {f: mc[f] for f in mc if f != "allocated"}


def test_runs_on_the_current_torch_stream():
    cfg, proj, k, v, q, pos = _problem(1)
    rope = sals.Rope.default(D)
    gpu = sals.LayerCache(cfg, rope, torch.from_numpy(proj).cuda(), device="cuda")
    k, v, q, pos = k.cuda(), v.cuda(), q.cuda(), pos.cuda()
    gpu.append(k[:, :S], v[:, :S], pos[:, :S])
    gpu.append(k[:, S:], v[:, S:], pos[:, S:])
    ref = gpu.attend(q, pos[:, S:])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = torch.empty_like(q)
        for _ in range(3):  # queue work behind itself on the side stream
            gpu.attend(q, pos[:, S:], out=out)
    side.synchronize()
    assert torch.equal(out, ref)


def test_stateless_ops_follow_the_input_device():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((97, 128)).astype(np.float32))
    proj = torch.from_numpy(rng.standard_normal((128, 32)).astype(np.float32))
    cpu = sals.project(x, proj)
    gpu = sals.project(x.cuda().requires_grad_(True), proj.cuda())
    assert gpu.is_cuda and not gpu.requires_grad
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    with pytest.raises(sals.InvalidArgumentError):
        sals.project(x.cuda(), proj)  # tensors of one call must share a device


def test_cpu_cache_refuses_cuda_tensors():
    cfg, proj, k, v, q, pos = _problem(3)
    cache = sals.LayerCache(cfg, sals.Rope.default(D), proj)
    with pytest.raises(sals.InvalidArgumentError, match=r"\bk\b"):
        cache.append(k.cuda(), v, pos)
