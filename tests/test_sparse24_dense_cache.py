"""The dense route's cached unpacked weight (ops/sparse24_dense.py, ops/_weight_cache.py): built once,
reused, rebuilt after in-place changes or a replaced meta, freed with the layer, off with
PRUNEKIT_SPARSE24_DENSE_CACHE=0; on CUDA, the dispatcher's dense route and graph capture."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.nn.sparse_linear import SparseLinear
from prunekit.ops import pack24 as pack_ops
from prunekit.ops import sparse24_dense as dense
from prunekit.ref import selection


def random_24_weight(n, k, gen, dtype=torch.float32):
    W = torch.randn(n, k, generator=gen)
    return (W * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)).to(dtype)


def make_layer(n, k, gen, bias=True, dtype=torch.float32, device="cpu"):
    values, meta = pack_ops.pack24(random_24_weight(n, k, gen, dtype))
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    layer = SparseLinear.from_packed(values.to(device), meta.to(device), None if b is None else b.to(device))
    return layer.requires_grad_(False)


@pytest.fixture
def unpack_calls(monkeypatch):
    """Counts the dense route's unpacks (each one is a cache miss, or a call with the cache off)."""
    calls = []
    real = dense.unpack

    def counting(values, meta):
        calls.append(values)
        return real(values, meta)

    monkeypatch.setattr(dense, "unpack", counting)
    monkeypatch.delenv(dense.ENV, raising=False)
    monkeypatch.setenv("PRUNEKIT_SPARSE_CPU", "dense")  # CPU: the op's dense route, not the SIMD kernel
    dense.clear_cache()
    yield calls
    dense.clear_cache()


def expected_output(layer, x):
    return F.linear(x, layer.weight, None if layer.bias is None else layer.bias.detach())


def test_built_once_and_reused(unpack_calls, gen):
    layer = make_layer(24, 40, gen)
    x = torch.randn(5, 40, generator=gen)
    first = layer(x)
    assert len(unpack_calls) == 1 and dense.is_cached(layer.values, layer.meta)
    for m in (1, 5, 33):
        torch.testing.assert_close(layer(torch.randn(m, 40, generator=gen)).shape, torch.Size([m, 24]))
    assert torch.equal(layer(x), first)
    assert len(unpack_calls) == 1
    other = make_layer(24, 40, gen)  # another weight gets its own copy
    other(x)
    assert len(unpack_calls) == 2 and len(dense._unpacked) == 2


def test_rebuilt_after_in_place_change_to_values(unpack_calls, gen):
    layer = make_layer(16, 32, gen)
    x = torch.randn(3, 32, generator=gen)
    before = layer(x)
    with torch.no_grad():
        layer.values.mul_(2)
    after = layer(x)
    assert len(unpack_calls) == 2
    torch.testing.assert_close(after - layer.bias, 2 * (before - layer.bias))
    torch.testing.assert_close(after, expected_output(layer, x))


def test_rebuilt_after_meta_is_replaced_or_edited(unpack_calls, gen):
    layer = make_layer(16, 32, gen)
    x = torch.randn(3, 32, generator=gen)
    layer(x)
    values, meta = pack_ops.pack24(random_24_weight(16, 32, gen))
    layer.meta = meta  # another pattern (values kept: still a valid 2:4 weight)
    torch.testing.assert_close(layer(x), expected_output(layer, x))
    assert len(unpack_calls) == 2
    layer.meta.copy_(pack_ops.pack24(random_24_weight(16, 32, gen))[1])  # edited in place
    torch.testing.assert_close(layer(x), expected_output(layer, x))
    assert len(unpack_calls) == 3
    layer.meta = layer.meta.clone()  # same contents, another tensor: rebuilt (identity, not contents)
    layer(x)
    assert len(unpack_calls) == 4


def test_rebuilt_after_the_layer_changes_dtype(unpack_calls, gen):
    layer = make_layer(16, 32, gen)
    x = torch.randn(3, 32, generator=gen)
    layer(x)
    layer.to(torch.bfloat16)  # the same Parameter object gets new data
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and len(unpack_calls) == 2
    assert torch.equal(y, expected_output(layer, x.bfloat16()))


def test_freed_with_the_layer(unpack_calls, gen):
    layer = make_layer(16, 32, gen)
    layer(torch.randn(2, 32, generator=gen))
    copy = weakref.ref(dense._unpacked._entries[layer.values].derived)
    values = weakref.ref(layer.values)
    del layer, unpack_calls[:]
    gc.collect()
    assert values() is None and copy() is None and len(dense._unpacked) == 0


def test_env_opt_out(unpack_calls, monkeypatch, gen):
    layer = make_layer(16, 32, gen)
    x = torch.randn(3, 32, generator=gen)
    cached = layer(x)
    assert dense.is_cached(layer.values, layer.meta)
    monkeypatch.setenv(dense.ENV, "0")
    uncached = [layer(x) for _ in range(3)]
    assert len(unpack_calls) == 4 and len(dense._unpacked) == 0  # the copy is dropped, one unpack per call
    assert all(torch.equal(y, cached) for y in uncached)
    monkeypatch.setenv(dense.ENV, "yes")
    with pytest.raises(ValueError, match="PRUNEKIT_SPARSE24_DENSE_CACHE must be 0 or 1"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_identical_with_and_without_the_cache(unpack_calls, monkeypatch, dtype, gen):
    layer = make_layer(40, 72, gen, dtype=dtype)
    x = torch.randn(2, 7, 72, generator=gen).to(dtype)
    with_cache = [layer(x), layer(x)]
    monkeypatch.setenv(dense.ENV, "0")
    without = layer(x)
    assert all(torch.equal(y, without) for y in with_cache)
    reference = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(without, reference)


def test_inference_tensors_are_cached_and_follow_mark_changed(unpack_calls, gen):
    from prunekit.ops import _weight_cache

    with torch.inference_mode():
        layer = make_layer(16, 32, gen)
        x = torch.randn(3, 32, generator=gen)
        ys = [layer(x) for _ in range(3)]
        assert len(unpack_calls) == 1 and len(dense._unpacked) == 1  # storage + owned version: one copy
        layer.values.mul_(2)  # invisible to torch's version counter (inference tensor) ...
        _weight_cache.mark_changed(layer.values)  # ... so the owner says so
        after = layer(x)
    assert len(unpack_calls) == 2
    assert torch.equal(ys[0], ys[2])
    torch.testing.assert_close(after - layer.bias, 2 * (ys[0] - layer.bias))


def test_load_state_dict_under_inference_mode_invalidates(unpack_calls, gen):
    """An in-place load into inference tensors is invisible to torch's version counter: SparseLinear's
    load_state_dict hook bumps the cache's own version, so the CUDA route's dense copy is rebuilt."""
    with torch.inference_mode():
        a, b = make_layer(16, 32, gen), make_layer(16, 32, gen)
        x = torch.randn(3, 32, generator=gen)
        dense.linear(x, a.values, a.meta, a.bias)
        a.load_state_dict(b.state_dict())
        got = dense.linear(x, a.values, a.meta, a.bias)
    assert torch.equal(got, F.linear(x, b.weight, b.bias))


def test_cache_built_under_inference_mode_serves_autograd(unpack_calls, gen):
    layer = make_layer(16, 32, gen)
    layer.values.requires_grad_(True)
    with torch.inference_mode():
        layer(torch.randn(3, 32, generator=gen))
    x = torch.randn(3, 32, generator=gen, requires_grad=True)
    layer(x).sum().backward()
    assert len(unpack_calls) == 1 and x.grad is not None and layer.values.grad is not None


def test_training_step_invalidates(unpack_calls, gen):
    layer = make_layer(16, 32, gen).requires_grad_(True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 32, generator=gen)
    for _ in range(2):
        opt.zero_grad()
        y = layer(x)
        torch.testing.assert_close(y, expected_output(layer, x).detach())
        y.square().sum().backward()
        opt.step()
    assert len(unpack_calls) == 2


def test_torch_compile_fullgraph_uses_the_cache(unpack_calls, gen):
    model = nn.Sequential(make_layer(24, 32, gen), nn.GELU(), make_layer(16, 24, gen, bias=False))
    x = torch.randn(3, 32, generator=gen)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    torch.testing.assert_close(compiled(torch.randn(7, 32, generator=gen)).shape, torch.Size([7, 16]))
    assert len(unpack_calls) == 2  # one per layer, from the eager call; the compiled calls reuse them


def test_opcheck_with_the_cache(unpack_calls, gen):
    layer = make_layer(12, 24, gen)
    x = torch.randn(3, 24, generator=gen)
    layer(x)  # a cached copy exists for these exact tensors
    args = (x, layer.values.detach(), layer.meta, layer.bias.detach())
    torch.library.opcheck(torch.ops.prunekit.sparse24_linear, args)
    torch.library.opcheck(torch.ops.prunekit.sparse24_linear, (x, layer.values, layer.meta, None))


# ---------------- GPU: the dispatcher's dense route ----------------

@pytest.mark.gpu
def test_cuda_dense_route_uses_the_cache(unpack_calls, monkeypatch):
    from prunekit.ops import sparse24_dispatch as dispatch

    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "dense")
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(6)
    layer = make_layer(384, 512, gen, dtype=torch.bfloat16, device="cuda")
    for m in (1, 16, 300, 1):
        x = torch.randn(m, 512, generator=gen).to(torch.bfloat16).cuda()
        expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        y = layer(x)
        assert float((y.float() - expected).norm() / expected.norm()) < 1e-2
    assert len(unpack_calls) == 1 and dense.is_cached(layer.values, layer.meta)
    with torch.no_grad():
        layer.values.mul_(-1)
    x = torch.randn(8, 512, generator=gen).to(torch.bfloat16).cuda()
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert float((layer(x).float() - expected).norm() / expected.norm()) < 1e-2
    assert len(unpack_calls) == 2


@pytest.mark.gpu
def test_auto_dispatch_keeps_the_dense_copy_only_where_dense_is_chosen(unpack_calls, monkeypatch):
    from prunekit.ops import sparse24_dispatch as dispatch

    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "auto")
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(7)
    layer = make_layer(1024, 1024, gen, dtype=torch.float16, device="cuda")
    for m in (1, 16, 4096):
        layer(torch.randn(m, 1024, generator=gen).to(torch.float16).cuda())
    routes = {k[-1]: r for k, r in dispatch.chosen_routes().items() if k[1:3] == (1024, 1024)}
    assert dense.is_cached(layer.values, layer.meta) == ("dense" in routes.values()), routes


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [True, False])
def test_cuda_graph_capture(unpack_calls, monkeypatch, warm):
    # a warm-up forward builds the copy, which the graph then reads; without one, the capture unpacks in the
    # graph (no cache entry built during capture) and stays correct on replay
    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "dense")
    gen = torch.Generator().manual_seed(8)
    layer = make_layer(256, 512, gen, dtype=torch.float16, device="cuda")
    x = torch.randn(64, 512, generator=gen).to(torch.float16).cuda()
    layer.weight  # compiles the Triton unpack outside the capture (not counted: not the dense route)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if warm:
            layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(x)
    assert len(unpack_calls) == 1 and dense.is_cached(layer.values, layer.meta) == warm
    x.copy_(torch.randn(64, 512, generator=gen).to(torch.float16))
    graph.replay()
    torch.cuda.synchronize()
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert float((captured.float() - expected).norm() / expected.norm()) < 1e-2
