"""The CPU route of SparseLinear / UnstructuredSparseLinear (nn/cpu_route.py, ops/sparse_cpu_route.py): the
choice follows the measurement, the layer never holds two copies of its weight, a layer turned dense still
saves the packed format, inference_mode / torch.compile / opcheck work, sparsify(unstructured=True)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.nn.sparse_linear import SparseLinear
from prunekit.nn.unstructured_linear import UnstructuredSparseLinear
from prunekit.ops import sparse24_dense, sparse_cpu, sparse_cpu_route as route
from prunekit.ref import bitmask, selection

pytestmark = pytest.mark.skipif(not sparse_cpu.available(), reason="prunekit._C has no sparse_linear_cpu")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(route.ENV_MODE, raising=False)
    route.clear()
    sparse24_dense.clear_cache()
    yield
    route.clear()
    sparse24_dense.clear_cache()


@pytest.fixture
def winner(monkeypatch):
    """Makes the measurement say which route wins: winner('dense') / winner('sparse')."""
    calls = []

    def set_winner(name):
        def fake(fns, **_):
            calls.append(sorted(fns))
            for fn in fns.values():
                fn()  # both candidates still run (they must work)
            return {n: (1.0 if n == name else 2.0) for n in fns}
        monkeypatch.setattr(route, "_median_times", fake)
        return calls
    return set_winner


def linear_24(n, k, gen, dtype=torch.float32, bias=True):
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4).to(dtype))
    return lin.requires_grad_(False)


def linear_unstructured(n, k, gen, sparsity=0.8, dtype=torch.float32):
    lin = nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.mul_((torch.rand(n, k, generator=gen) >= sparsity).to(dtype))
    return lin.requires_grad_(False)


def weight_bytes(module):
    return sum(t.numel() * t.element_size() for name, t in list(module.named_parameters()) + list(module.named_buffers())
               if name != "bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_wins_one_packed_copy(dtype, gen, winner):
    calls = winner("sparse")
    lin = linear_24(48, 64, gen, dtype)
    layer = SparseLinear.from_dense(lin)
    for M in (1, 5, 40):
        x = torch.randn(M, 64, generator=gen).to(dtype)
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)
    assert len(calls) == 3 and not layer.is_dense
    assert set(route.chosen_routes().values()) == {"sparse"}
    assert len(sparse24_dense._unpacked) == 0  # no dense copy anywhere
    dense_bytes = lin.weight.numel() * lin.weight.element_size()
    assert weight_bytes(layer) <= 0.6 * dense_bytes


def test_dense_wins_dense_is_the_only_copy(gen, winner, tmp_path):
    winner("dense")
    lin = linear_24(40, 64, gen)
    layer = SparseLinear.from_dense(lin)
    values, meta = layer.values.detach().clone(), layer.meta.clone()
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.is_dense and layer.values.numel() == 0 and layer.meta.numel() == 0
    assert weight_bytes(layer) == lin.weight.numel() * 4 and len(sparse24_dense._unpacked) == 0
    # the saved format stays 2:4
    state = layer.state_dict()
    assert torch.equal(state["values"], values) and torch.equal(state["meta"], meta)
    assert "_dense_weight" not in state
    model = nn.Sequential(layer)
    pk.save(model, tmp_path)
    loaded = pk.load(nn.Sequential(nn.Linear(64, 40)), tmp_path)
    assert isinstance(loaded[0], SparseLinear) and torch.equal(loaded[0].values, values)
    layer.repack()
    assert not layer.is_dense and torch.equal(layer.values, values) and torch.equal(layer.meta, meta)


def fake_route(monkeypatch, table, unpack_s=0.1):
    """_median_times answers from `table` by the probe's M bucket; unpacking takes `unpack_s`."""
    seen = []
    real_randn = torch.randn

    def randn(*shape, **kw):  # decide() builds its probe with torch.randn(bucket, K): note the bucket
        if "generator" not in kw:
            seen.append(shape[0])
        return real_randn(*shape, **kw)

    def fake(fns, **_):
        dense, sparse = table.get(seen[-1], (1.0, 0.5))
        return {"dense": dense, "sparse": sparse}
    monkeypatch.setattr(route.torch, "randn", randn)
    monkeypatch.setattr(route, "_median_times", fake)
    monkeypatch.setattr(route, "unpack_seconds", lambda *a: unpack_s)
    return seen


def test_layer_form_follows_the_decode_bucket(gen, monkeypatch):
    # the prompt (M=8) comes first and dense wins it; decode (M=1) is measured on the spot and sparse wins it:
    # the layer stays packed (decode never slower), and the prompt runs dense on a transient unpacked copy
    seen = fake_route(monkeypatch, {8: (1.0, 2.0), 1: (1.0, 0.5)}, unpack_s=0.5)
    lin = linear_24(32, 64, gen)
    layer = SparseLinear.from_dense(lin)
    calls = []
    monkeypatch.setattr(SparseLinear, "_unpacked", lambda self, f=SparseLinear._unpacked: calls.append(1) or f(self))
    x8 = torch.randn(8, 64, generator=gen)
    torch.testing.assert_close(layer(x8), lin(x8))
    assert seen == [1, 8] and not layer.is_dense  # decode measured first
    assert len(calls) == 3  # one dense weight per measurement, then the call's transient one
    assert len(sparse24_dense._unpacked) == 0  # no cached dense copy
    torch.testing.assert_close(layer(x8), lin(x8))
    assert len(calls) == 4 and seen == [1, 8]  # measured once
    x1 = torch.randn(1, 64, generator=gen)
    torch.testing.assert_close(layer(x1), lin(x1))
    assert len(calls) == 4 and not layer.is_dense  # decode: the kernel
    # a bucket where dense wins, but unpacking costs more than the kernel loses: the kernel
    route.clear()
    fake_route(monkeypatch, {8: (1.0, 1.2), 1: (1.0, 0.5)}, unpack_s=0.5)
    layer(x8)  # measures
    calls.clear()
    torch.testing.assert_close(layer(x8), lin(x8))
    assert not calls and not layer.is_dense


def test_dense_decode_bucket_makes_the_layer_dense(gen, monkeypatch):
    fake_route(monkeypatch, {1: (0.5, 1.0)})  # dense wins decode (sparse would win at M=64)
    lin = linear_24(32, 64, gen)
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(64, 64, generator=gen)
    torch.testing.assert_close(layer(x), lin(x))
    assert layer.is_dense and layer.values.numel() == 0
    other = SparseLinear.from_dense(linear_24(32, 64, gen))  # same shape: dense at once, no new measurement
    monkeypatch.setattr(route, "_median_times", lambda fns, **_: pytest.fail("measured twice"))
    other(torch.randn(1, 64, generator=gen))
    assert other.is_dense
    # batched decoding: PRUNEKIT_SPARSE_CPU_DECODE_M names the bucket that decides
    route.clear()
    fake_route(monkeypatch, {1: (0.5, 1.0), 4: (1.0, 0.5)})
    monkeypatch.setenv(route.ENV_DECODE_M, "4")
    third = SparseLinear.from_dense(linear_24(32, 64, gen))
    third(torch.randn(1, 64, generator=gen))
    assert not third.is_dense
    monkeypatch.setenv(route.ENV_DECODE_M, "0")
    with pytest.raises(ValueError, match=route.ENV_DECODE_M):
        third(torch.randn(2, 64, generator=gen))


def test_forced_modes_and_real_measurement(gen, monkeypatch):
    lin = linear_24(24, 32, gen)
    x = torch.randn(4, 32, generator=gen)
    monkeypatch.setenv(route.ENV_MODE, "sparse")
    layer = SparseLinear.from_dense(lin)
    torch.testing.assert_close(layer(x), lin(x))
    assert not layer.is_dense and len(sparse24_dense._unpacked) == 0
    monkeypatch.setenv(route.ENV_MODE, "dense")  # the op's dense route on the packed weight (cached copy)
    torch.testing.assert_close(layer(x), lin(x))
    assert not layer.is_dense and sparse24_dense.is_cached(layer.values, layer.meta)
    monkeypatch.setenv(route.ENV_MODE, "fastest")
    with pytest.raises(ValueError, match=route.ENV_MODE):
        layer(x)
    monkeypatch.delenv(route.ENV_MODE)
    sparse24_dense.clear_cache()
    layer = SparseLinear.from_dense(lin)
    torch.testing.assert_close(layer(x), lin(x))  # a real timing, whichever wins
    choices = {k[5]: v for k, v in route.chosen_routes().items()}  # M bucket -> choice
    assert layer.is_dense == (choices[1] == "dense")  # the decode bucket decides the form
    # dense won decode: the layer turned dense, nothing else measured; else this call's bucket was measured too
    assert set(choices) == ({1} if layer.is_dense else {1, 4})
    assert len(route.timings()) == len(choices)


def test_inference_mode_and_training_keep_packed(gen, winner):
    winner("dense")
    lin = linear_24(16, 32, gen)
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(2, 32, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), lin(x))
    assert layer.is_dense and not layer._dense_weight.is_inference()
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()  # the converted weight works outside inference mode too
    torch.testing.assert_close(xg.grad, lin.weight.sum(0).expand(2, -1))
    trainable = SparseLinear.from_dense(linear_24(16, 32, gen).requires_grad_(True))
    trainable(x)
    assert not trainable.is_dense  # a layer being trained keeps its packed (2:4-preserving) values
    with torch.no_grad():  # inference on a model whose parameters require grad (HF generate): one copy
        trainable(x)
    assert trainable.is_dense and len(sparse24_dense._unpacked) <= 1


def test_torch_compile(gen, monkeypatch):
    monkeypatch.setenv(route.ENV_MODE, "sparse")
    lin = linear_24(32, 64, gen)
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(5, 64, generator=gen)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))


def test_opcheck(gen, monkeypatch):
    monkeypatch.setenv(route.ENV_MODE, "sparse")
    lin = linear_24(16, 32, gen)
    layer = SparseLinear.from_dense(lin)
    x = torch.randn(3, 32, generator=gen)
    torch.library.opcheck(torch.ops.prunekit.sparse24_linear, (x, layer.values.detach(), layer.meta, lin.bias),
                          test_utils=("test_schema", "test_faketensor"))
    u = UnstructuredSparseLinear.from_dense(linear_unstructured(16, 32, gen))
    torch.library.opcheck(torch.ops.prunekit.bitmask_linear, (x, u.values, u.mask, u.row_offsets, u.bias))


def test_unstructured_layer_routes_and_round_trip(gen, winner, tmp_path):
    winner("sparse")
    lin = linear_unstructured(40, 96, gen, 0.85, torch.bfloat16)
    layer = UnstructuredSparseLinear.from_dense(lin)
    x = torch.randn(7, 96, generator=gen).to(torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), lin(x).float(), rtol=1e-2, atol=2e-2)
    assert not layer.is_dense and weight_bytes(layer) < 0.6 * lin.weight.numel() * 2
    model = nn.Sequential(layer)
    pk.save(model, tmp_path)
    fresh_model = nn.Sequential(nn.Linear(96, 40).to(torch.bfloat16))
    pk.load(fresh_model, tmp_path)
    loaded = fresh_model[0]
    assert isinstance(loaded, UnstructuredSparseLinear)
    assert torch.equal(loaded.values, layer.values) and torch.equal(loaded.mask, layer.mask)
    assert torch.equal(loaded.row_offsets, layer.row_offsets) and torch.equal(loaded.weight, lin.weight)
    winner("dense")
    route.clear()
    dense_layer = UnstructuredSparseLinear.from_dense(lin)
    dense_layer(x)
    assert dense_layer.is_dense and dense_layer.values.numel() == 0
    state = dense_layer.state_dict()
    assert torch.equal(state["values"], layer.values) and torch.equal(state["mask"], layer.mask)
    dense_layer.load_state_dict(layer.state_dict())  # back to packed from a file
    assert not dense_layer.is_dense and torch.equal(dense_layer.row_offsets, layer.row_offsets)


def test_sparsify_unstructured(gen, winner):
    winner("sparse")
    model = nn.Sequential(linear_24(32, 64, gen), nn.ReLU(), linear_unstructured(48, 32, gen, 0.8),
                          nn.ReLU(), linear_unstructured(16, 48, gen, 0.3))
    x = torch.randn(3, 64, generator=gen)
    ref = model(x)
    report = pk.sparsify(model, unstructured=True)
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], UnstructuredSparseLinear)
    assert "min_sparsity" in report.skipped["4"] and isinstance(model[4], nn.Linear)
    torch.testing.assert_close(model(x), ref)
    from prunekit.nn.swap import dense_state_dict  # save_pretrained's dense layout covers the bitmask layers
    state = dense_state_dict(model)
    assert torch.equal(state["2.weight"], model[2].weight) and "2.values" not in state and "2.mask" not in state
    plain = nn.Sequential(linear_unstructured(48, 32, gen, 0.8))
    assert pk.sparsify(plain).skipped and type(plain[0]) is nn.Linear  # default: 2:4 only
    with pytest.raises(ValueError, match="values"):
        bad = UnstructuredSparseLinear.from_dense(linear_unstructured(8, 16, gen))
        state = bad.state_dict()
        state["values"] = torch.cat([state["values"], torch.zeros(3)])
        bad.load_state_dict(state)
    assert bitmask.PADDING == 16


def test_tie_keeps_the_packed_weight(gen, monkeypatch):
    lin = linear_24(16, 32, gen)
    x = torch.randn(2, 32, generator=gen)
    monkeypatch.setattr(route, "_median_times", lambda fns, **_: {"dense": 1.0, "sparse": 1.02})  # 0.98x: kept
    layer = SparseLinear.from_dense(lin)
    layer(x)
    assert not layer.is_dense
    route.clear()
    monkeypatch.setattr(route, "_median_times", lambda fns, **_: {"dense": 1.0, "sparse": 1.05})  # 0.95x: dense
    layer(x)
    assert layer.is_dense


def test_small_buckets_are_timed_with_cold_caches(gen, monkeypatch):
    evictions = []
    monkeypatch.setattr(route, "_evict_caches", lambda: evictions.append(1))
    layer = SparseLinear.from_dense(linear_24(16, 32, gen))
    route.decide("2:4", torch.zeros(64, 32), 16, True, layer._sparse_call, layer._unpacked, layer.bias.detach())
    assert not evictions  # compute-bound bucket: weights warm
    route.decide("2:4", torch.zeros(1, 32), 16, True, layer._sparse_call, layer._unpacked, layer.bias.detach())
    assert len(evictions) >= 10  # one before each timed call of both candidates (>= 5 rounds)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["2:4", "bitmask"])
def test_cached_plan_runs_the_unchecked_kernel_and_follows_new_measurements(gen, winner, monkeypatch, kind, bias):
    """The layer caches its plan per M bucket and route context, so a call skips the measurement and the
    per-call checks (run_validated); the output still equals the reference, with and without bias, and a
    new measurement (route.clear()) or a forced mode is followed at the next call."""
    if kind == "2:4":
        lin = linear_24(24, 40, gen, bias=bias)
        layer = SparseLinear.from_dense(lin)
    else:
        lin = linear_unstructured(24, 40, gen)
        if not bias:
            lin.bias = None
        layer = UnstructuredSparseLinear.from_dense(lin)
    unchecked = []
    real = sparse_cpu.run_validated
    monkeypatch.setattr(sparse_cpu, "run_validated", lambda *a: unchecked.append(a[-1]) or real(*a))
    calls = winner("sparse")
    x = torch.randn(3, 5, 40, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert len(calls) == 2  # the decode bucket and this M, each measured on the unchecked kernel
        assert len(unchecked) == 3  # 2 measurements (each runs both candidates once) + the call itself
        unchecked.clear()
        for _ in range(3):
            torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 and len(unchecked) == 3  # no new measurement; the kernel every call
    monkeypatch.setenv(route.ENV_MODE, "dense")  # a forced mode: the op's route, not the cached plan
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert len(unchecked) == 3 and not layer.is_dense
    monkeypatch.delenv(route.ENV_MODE)
    route.clear()
    winner("dense")
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert layer.is_dense and len(unchecked) == 4  # the decode bucket measured again (both ran once); dense now


def test_serve_m_decides_the_form_per_model(gen, monkeypatch):
    """pk.sparsify(model, serve_m=...): an encoder run at 300 tokens per call keeps the form that wins there,
    whatever wins at M = 1 (and the env's decode bucket does not override the model's own setting)."""
    big = route.bucket(300)
    seen = fake_route(monkeypatch, {1: (1.0, 0.5), big: (0.5, 1.0)})  # kernel wins decode, dense wins M = 300
    model = nn.Sequential(linear_24(32, 64, gen), nn.ReLU(), linear_24(16, 32, gen))
    dense = [model[0].weight.clone(), model[2].weight.clone()]
    report = pk.sparsify(model, serve_m=300)
    assert report.swapped == ["0", "2"] and model[0].serve_m == 300
    x = torch.randn(1, 64, generator=gen)  # even an M = 1 call: the form follows M = 300's bucket
    ref = F.linear(F.relu(F.linear(x, dense[0], model[0].bias)), dense[1], model[2].bias)
    torch.testing.assert_close(model(x), ref)
    assert model[0].is_dense and model[2].is_dense and big in seen
    other = SparseLinear.from_dense(linear_24(32, 64, gen))  # the default: decode bucket M = 1 -> packed
    other(x)
    assert not other.is_dense
    monkeypatch.setenv(route.ENV_DECODE_M, "1")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="serve_m"):
            pk.sparsify(nn.Sequential(linear_24(8, 16, gen)), serve_m=bad)


def test_cold_timing_flushes_exactly_the_weights(gen, monkeypatch):
    """Given the packed tensors, a cold bucket evicts just the weights (both forms) before each timed call,
    not the whole cache (which also evicts the interpreter's data: a constant that blurs small layers)."""
    from prunekit import _native

    mod = _native.require_cpu_module()
    assert mod.flush_cache_lines(torch.zeros(100).data_ptr(), 400) is True  # x86-64: clflush always exists
    evictions, flushed = [], []
    monkeypatch.setattr(route, "_evict_caches", lambda: evictions.append(1))
    real = mod.flush_cache_lines
    monkeypatch.setattr(mod, "flush_cache_lines", lambda p, n: flushed.append((p, n)) or real(p, n))
    layer = SparseLinear.from_dense(linear_24(16, 32, gen))
    bias = layer.bias.detach()
    route.decide("2:4", torch.zeros(1, 32), 16, True, layer._sparse_call, layer._unpacked, bias,
                 (layer.values, layer.meta))
    assert not evictions
    sizes = [n for _, n in flushed]
    per_call = [16 * 32 * 4, bias.numel() * 4, layer.values.numel() * 4, layer.meta.numel()]  # W, bias, values, meta
    assert sizes.count(per_call[0]) >= 10 and sizes.count(per_call[3]) >= 10  # before each call of both candidates
    assert {p for p, _ in flushed} >= {bias.data_ptr(), layer.values.data_ptr(), layer.meta.data_ptr()}
