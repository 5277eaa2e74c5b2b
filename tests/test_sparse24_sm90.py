"""The Hopper CUTLASS 2:4 prefill GEMM: build reporting, host-side sizes, the weight cache and the
dispatcher rules on CPU; on a Hopper GPU, the kernel against the dense reference."""
import gc
import os

import pytest
import torch
import torch.nn.functional as F

from prunekit import _native
from prunekit.ops import pack24 as pack_ops
from prunekit.ops import sparse24_dispatch as dispatch
from prunekit.ops import sparse24_sm90 as sm90
from prunekit.ref import selection

BF16 = _native.DTYPE_CODES[torch.bfloat16]
FP16 = _native.DTYPE_CODES[torch.float16]


def random_24_weight(n, k, gen, dtype=torch.float32):
    W = torch.randn(n, k, generator=gen)
    W = W * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)
    W[: min(n, 3), :8] = 0  # all-zero groups: explicit zeros in the format
    W[3:5, 8:16] = W[3:5, 8:16] * torch.tensor([0, 0, 0, 1.0] * 2)  # groups with one nonzero, at position 3
    return W.to(dtype)


def cuda_module_or_skip():
    mod = _native.cuda_module()
    if mod is None:
        pytest.skip(f"prunekit._C_cuda not built here: {_native._errors.get('_C_cuda')}")
    return mod


def sm90_module_or_skip():
    """The CUDA module when it holds the sm90 GEMM. A build without CUTLASS_DIR skips it (loudly, at
    build time and in backends()); PRUNEKIT_REQUIRE_SM90=1 (CI, GPU runs) turns that into a failure."""
    mod = cuda_module_or_skip()
    compiled, why = sm90.compiled()
    if not compiled:
        if os.environ.get("PRUNEKIT_REQUIRE_SM90") == "1":
            pytest.fail(f"PRUNEKIT_REQUIRE_SM90=1 but the sm90 2:4 GEMM was not built: {why}")
        pytest.skip(f"the sm90 2:4 GEMM was not built: {why}")
    return mod


# ---------------- CPU: build, host-side sizes, cache and dispatch rules ----------------

def test_build_has_the_sm90_gemm():
    mod = sm90_module_or_skip()
    assert mod.sparse24_sm90_compiled(), mod.sparse24_sm90_reason()
    assert mod.sparse24_sm90_reason() == ""
    assert hasattr(mod, "sparse24_sm90_gemm") and hasattr(mod, "sparse24_sm90_compress")


def test_backends_report_the_sm90_gemm():
    cuda_module_or_skip()
    compiled, why = sm90.compiled()
    assert _native.backends()["cuda"]["sparse24_sm90"] == {"available": compiled, "reason": why}
    assert compiled or why  # a build without it says why


@pytest.mark.parametrize("code", [BF16, FP16])
@pytest.mark.parametrize("n,k", [(8, 16), (64, 128), (264, 272), (4096, 4096), (11008, 4096)])
def test_compressed_sizes(code, n, k):
    # compressed A: K/2 halves per row; metadata: one nibble per 4 inputs, padded to 64-row x 128-input atoms
    mod = sm90_module_or_skip()
    compressed, metadata, workspace = mod.sparse24_sm90_sizes(n, k, code)
    assert compressed == n * (k // 2) * 2
    assert metadata == (-(-n // 64) * 64) * (-(-k // 128) * 128) // 8
    assert workspace >= 0


@pytest.mark.parametrize("n,k,code,error", [(8, 8, BF16, ValueError), (12, 16, BF16, ValueError),
                                            (0, 16, BF16, ValueError), (8, 16, 0, RuntimeError)])
def test_unsupported_shapes_and_dtypes_raise(n, k, code, error):
    mod = sm90_module_or_skip()
    with pytest.raises(error, match="sparse24_sm90_sizes"):
        mod.sparse24_sm90_sizes(n, k, code)


@pytest.mark.parametrize("code", [BF16, FP16])
@pytest.mark.parametrize("m", [1, 128, 130, 1000])
@pytest.mark.parametrize("n,k", [(8, 16), (264, 272), (1000, 1024), (4096, 4096), (4096, 11008)])
def test_cutlass_accepts_the_arguments_we_build(code, m, n, k):
    # host-only: CUTLASS's can_implement on our compressed-A / metadata layouts and x / y strides
    mod = sm90_module_or_skip()
    assert mod.sparse24_sm90_can_implement(m, n, k, code)


@pytest.mark.parametrize("m,n,k", [(128, 12, 64), (128, 64, 24), (128, 64, 8)])
def test_cutlass_rejects_misaligned_shapes(m, n, k):
    mod = sm90_module_or_skip()
    assert not mod.sparse24_sm90_can_implement(m, n, k, BF16)


def test_gemm_workspace_query_is_host_only():
    mod = sm90_module_or_skip()
    assert mod.sparse24_sm90_workspace_bytes(1000, 4096, 4096, BF16, 132) >= 0
    with pytest.raises(ValueError):
        mod.sparse24_sm90_workspace_bytes(1000, 4096, 4096, BF16, 0)


def test_support_rules():
    x = torch.zeros(256, 64, dtype=torch.bfloat16)
    values = torch.zeros(64, 32, dtype=torch.bfloat16)
    assert not sm90.supports(x, values, 64)  # bucket below 128: decode kernel / dense
    assert not sm90.supports(x, values.float(), 256)
    assert not sm90.supports(x, torch.zeros(60, 32, dtype=torch.bfloat16), 256)  # N % 8
    assert not sm90.supports(x[:, :40], torch.zeros(64, 20, dtype=torch.bfloat16), 256)  # K % 16
    assert not sm90.supports(x, values, 256)  # CPU tensors
    assert dispatch._candidates(x, values) == []


def test_forced_mode_is_validated(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "sm90")
    assert dispatch._mode() == "sm90"
    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="auto, mma, sm90, v2 or dense"):
        dispatch._mode()


def test_conversion_is_cached_per_weight_and_follows_changes(monkeypatch, gen):
    calls = []

    def fake_compress(values, meta):
        calls.append(values)
        return sm90.Sm90Weight(values.clone(), meta.clone())

    monkeypatch.setattr(sm90, "compress", fake_compress)
    sm90.clear_cache()
    values, meta = pack_ops.pack24(random_24_weight(16, 64, gen))
    first = sm90.prepared(values, meta)
    assert sm90.prepared(values, meta) is first and len(calls) == 1 and sm90.is_prepared(values, meta)
    with torch.no_grad():
        values.mul_(2)  # trained / edited in place: the converted copy is stale
    assert not sm90.is_prepared(values, meta)
    assert torch.equal(sm90.prepared(values, meta).compressed, values) and len(calls) == 2
    other_meta = meta.clone()  # a replaced meta buffer
    sm90.prepared(values, other_meta)
    assert len(calls) == 3
    other = values.clone()  # another weight gets its own entry
    sm90.prepared(other, meta)
    assert len(calls) == 4 and len(sm90._prepared) == 2
    del other, calls[:]
    gc.collect()
    assert len(sm90._prepared) == 1  # dropped with its weight
    sm90.clear_cache()


# ---------------- GPU (Hopper): the real kernel against the reference ----------------

def hopper_or_skip():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm90 2:4 GEMM runs on compute capability 9.x only")
    if not sm90.compiled()[0]:
        pytest.fail(f"sm90 2:4 GEMM missing from this build: {sm90.compiled()[1]}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 128, 130, 1000])
@pytest.mark.parametrize("n,k", [(8, 16), (264, 272), (1000, 1024), (4096, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_reference(dtype, m, n, k, bias):
    hopper_or_skip()
    gen = torch.Generator().manual_seed(m * 1000 + n)
    W = random_24_weight(n, k, gen, dtype)
    values, meta = (t.cuda() for t in pack_ops.pack24(W))
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda() if bias else None
    expected = F.linear(x.float(), W.float().cuda(), None if b is None else b.float())
    y = sm90.linear(x, values, meta, b)
    assert y.dtype == dtype and y.shape == (m, n)
    err = (y.float() - expected).abs().max() / expected.abs().max()
    assert err < 1e-2, f"max rel err {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_exact_on_small_integers(dtype):
    # every product and partial sum is exact in fp32, so y must equal the exact result rounded once
    hopper_or_skip()
    gen = torch.Generator().manual_seed(1)
    n, k, m = 200, 528, 333
    W = (torch.randint(-3, 4, (n, k), generator=gen).float()
         * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)).to(dtype)
    x = torch.randint(-3, 4, (m, k), generator=gen).to(dtype)
    b = torch.randint(-8, 9, (n,), generator=gen).to(dtype)
    values, meta = pack_ops.pack24(W)
    y = sm90.linear(x.cuda(), values.cuda(), meta.cuda(), b.cuda())
    assert torch.equal(y.cpu(), (x.float() @ W.float().t() + b.float()).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sm90", "auto"])
def test_sparse_linear_prefill_on_hopper(mode, monkeypatch):
    hopper_or_skip()
    from prunekit.nn.sparse_linear import SparseLinear

    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", mode)
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(1024, 768).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(random_24_weight(768, 1024, gen, torch.bfloat16))
    sparse = SparseLinear.from_dense(lin).cuda().requires_grad_(False)
    lin = lin.cuda()
    for lead in [(130,), (2, 500), (1000,), (4096,), (3,)]:
        x = torch.randn(*lead, 1024, generator=gen).to(torch.bfloat16).cuda()
        expected = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        y = sparse(x)
        assert y.shape == (*lead, 768)
        assert float((y.float() - expected).norm() / expected.norm()) < 1e-2
    if mode == "sm90":
        assert sm90.is_prepared(sparse.values, sparse.meta)
    else:
        assert set(dispatch.chosen_routes().values()) <= {"mma", "v2", "sm90", "dense"}
    with torch.no_grad():  # an in-place edit of the weight must reach the kernel
        sparse.values.mul_(-1)
    x = torch.randn(256, 1024, generator=gen).to(torch.bfloat16).cuda()
    expected = -F.linear(x.float(), lin.weight.float()) + lin.bias.float()
    assert float((sparse(x).float() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.gpu
def test_cuda_graph_capture_after_the_first_call(monkeypatch):
    # the conversion and the timing happen on the first (eager) call; a captured graph then replays sm90
    hopper_or_skip()
    from prunekit.nn.sparse_linear import SparseLinear

    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "sm90")
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(4)
    W = random_24_weight(512, 768, gen, torch.float16)
    sparse = SparseLinear.from_packed(*(t.cuda() for t in pack_ops.pack24(W)))
    x = torch.randn(300, 768, generator=gen).to(torch.float16).cuda()
    eager = sparse(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sparse(x)
    x.copy_(torch.randn(300, 768, generator=gen).to(torch.float16))
    graph.replay()
    expected = F.linear(x.float(), W.float().cuda())
    assert float((captured.float() - expected).norm() / expected.norm()) < 1e-2
    assert not torch.equal(captured, eager)
