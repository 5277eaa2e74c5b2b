"""C++ CPU sparse linear kernels (ops/sparse_cpu.py): 2:4 and bitmask formats, every ISA path this CPU runs
(scalar and AVX2 forced on an AVX-512 machine), fp32/bf16/fp16, odd shapes, every M bucket, against a plain
PyTorch reference in float64."""
import pytest
import torch
import torch.nn.functional as F

from prunekit.ops import bitmask_linear as bitmask_ops  # noqa: F401  (registers prunekit::bitmask_unpack)
from prunekit.ops import pack24 as pack_ops  # noqa: F401  (registers prunekit::pack24)
from prunekit.ops import sparse_cpu
from prunekit.ref import bitmask, selection

pytestmark = pytest.mark.skipif(not sparse_cpu.available(), reason="prunekit._C has no sparse_linear_cpu")

ISAS = ["scalar", "avx2", "avx512", "avx512bf16"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# K: one group short of a chunk, K blocks + tails (1032 = 1024 + 8); M: 1, every bucket, tile edges (17: two
# 16-token units, 40: three, 65: a 64-token tile + one unit, 257: four tiles + one unit)
SHAPES = [(13, 40), (21, 1032)]
MS = [1, 3, 16, 17, 40, 65, 257]


def need(isa):
    if not sparse_cpu.isa_supported(isa):
        pytest.skip(f"this CPU cannot run the {isa} path (best: {sparse_cpu.best_isa()})")


def rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def weight_24(n, k, gen, dtype):
    return (torch.randn(n, k, generator=gen) * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)).to(dtype)


def weight_unstructured(n, k, gen, dtype, sparsity):
    return (torch.randn(n, k, generator=gen) * (torch.rand(n, k, generator=gen) >= sparsity)).to(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_matches_reference(isa, dtype, gen):
    need(isa)
    for n, k in SHAPES:
        W = weight_24(n, k, gen, dtype)
        values, meta = torch.ops.prunekit.pack24(W)
        bias = torch.randn(n, generator=gen).to(dtype)
        for M in MS:
            x = torch.randn(M, k, generator=gen).to(dtype)
            ref = F.linear(x.double(), W.double(), bias.double())
            y = sparse_cpu.s24_linear(x, values, meta, bias, isa=isa)
            assert y.dtype == dtype and y.shape == (M, n)
            assert rel_err(y, ref) < TOL[dtype], (isa, dtype, n, k, M)
        y = sparse_cpu.s24_linear(x[:1], values, meta, None, isa=isa)  # no bias
        assert rel_err(y, F.linear(x[:1].double(), W.double())) < TOL[dtype]


@pytest.mark.parametrize("isa", ISAS)
def test_sparse24_bf16_every_m(isa, gen):
    """bf16 2:4 at every M from 1 to 17 and around the token blocks (the avx512bf16 path's row-panel kernel:
    up to 16 tokens in registers, more in blocks of 16 and passes of 64; also M = 1 from K = 4096), with and
    without bias; N: partial 8-row panels; K: whole 32-input chunks (256) and a chunk tail (40: 2 groups,
    1048 and 4104: 6 groups)."""
    need(isa)
    for n, k in ((5, 40), (35, 256), (16, 1048), (9, 4104)):
        W = weight_24(n, k, gen, torch.bfloat16)
        values, meta = torch.ops.prunekit.pack24(W)
        bias = torch.randn(n, generator=gen).to(torch.bfloat16)
        for M in list(range(1, 18)) + [24, 33, 64, 65, 129, 300]:
            x = torch.randn(M, k, generator=gen).to(torch.bfloat16)
            for b in (bias, None):
                ref = F.linear(x.double(), W.double(), None if b is None else b.double())
                y = sparse_cpu.s24_linear(x, values, meta, b, isa=isa)
                assert y.dtype == torch.bfloat16 and y.shape == (M, n)
                assert rel_err(y, ref) < TOL[torch.bfloat16], (isa, n, k, M, b is None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_matches_reference(isa, dtype, gen):
    need(isa)
    # 64-input words keeping 0, <= 16, 17..32 and > 32 values (the M = 1 kernels take 16 kept values per step,
    # the bf16 few-token kernel 32); M: also 2..9, the few-token kernels (up to 4 fp32, 8 bf16) and the
    # one-tile list kernel (M <= 16)
    for (n, k), sparsity in zip(SHAPES + [(9, 8), (11, 200)], (0.8, 0.9, 0.5, 0.3)):
        W = weight_unstructured(n, k, gen, dtype, sparsity)
        W[0] = 0  # an empty row
        W[-1, :64] = 1.5  # a full word
        values, mask = bitmask.pack(W)
        offsets = bitmask.row_offsets(mask)
        bias = torch.randn(n, generator=gen).to(dtype)
        for M in sorted(MS + [2, 4, 5, 8, 9]):
            x = torch.randn(M, k, generator=gen).to(dtype)
            ref = F.linear(x.double(), W.double(), bias.double())
            y = sparse_cpu.bitmask_linear(x, values, mask, offsets, bias, isa=isa)
            assert rel_err(y, ref) < TOL[dtype], (isa, dtype, n, k, M)


@pytest.mark.parametrize("isa", ISAS)
def test_long_rows(isa, gen):
    """K > 8192 (the M = 1 2:4 kernel then takes 4 rows at a time; 7 rows: a partial last step) and a K tail."""
    need(isa)
    n, k = 7, 8232
    for dtype in (torch.float32, torch.bfloat16):
        W = weight_24(n, k, gen, dtype)
        values, meta = torch.ops.prunekit.pack24(W)
        Wu = weight_unstructured(n, k, gen, dtype, 0.8)
        bv, bm = bitmask.pack(Wu)
        for M in (1, 2, 5, 16):  # bitmask: M = 1, few-token and list kernels across many K blocks
            x = torch.randn(M, k, generator=gen).to(dtype)
            assert rel_err(sparse_cpu.s24_linear(x, values, meta, isa=isa), F.linear(x.double(), W.double())) < TOL[dtype]
            y = sparse_cpu.bitmask_linear(x, bv, bm, bitmask.row_offsets(bm), isa=isa)
            assert rel_err(y, F.linear(x.double(), Wu.double())) < TOL[dtype]


def test_leading_dims_threads_and_env(gen, monkeypatch):
    W = weight_24(24, 64, gen, torch.float32)
    values, meta = torch.ops.prunekit.pack24(W)
    x = torch.randn(2, 3, 64, generator=gen)
    ref = F.linear(x, W)
    for threads in (1, 2, 3):
        torch.testing.assert_close(sparse_cpu.s24_linear(x, values, meta, threads=threads), ref)
    monkeypatch.setenv(sparse_cpu.ENV_ISA, "scalar")
    torch.testing.assert_close(sparse_cpu.s24_linear(x, values, meta), ref)
    monkeypatch.setenv(sparse_cpu.ENV_ISA, "sse9")
    with pytest.raises(ValueError, match="PRUNEKIT_CPU_ISA"):
        sparse_cpu.s24_linear(x, values, meta)
    monkeypatch.delenv(sparse_cpu.ENV_ISA)
    assert sparse_cpu.s24_linear(torch.zeros(0, 64), values, meta).shape == (0, 24)


def test_bitmask_packing_is_exact(gen):
    for dtype in DTYPES:
        W = weight_unstructured(17, 48, gen, dtype, 0.7)
        W[3, 5] = -0.0  # a negative zero is not kept (as in the 2:4 format)
        values, mask = bitmask.pack(W)
        keep = W.float() != 0
        assert values.shape == (int(keep.sum()) + bitmask.PADDING,)
        assert torch.equal(values[:-bitmask.PADDING], W[keep])
        assert torch.equal(bitmask.row_offsets(mask)[1:], torch.cumsum(keep.sum(1), 0))
        for r, c in ((0, 0), (16, 47), (5, 9)):
            assert bool((int(mask[r, c // 8]) >> (c % 8)) & 1) == bool(keep[r, c])
        assert torch.equal(bitmask.unpack(values, mask), torch.where(keep, W, torch.zeros_like(W)))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_unpack_is_exact(isa, dtype, gen):
    """The C++ unpack (AVX-512 vpexpandd, portable loop) equals ref/bitmask.unpack bit for bit: odd shapes, a
    K tail of 8, empty and full rows and words, every sparsity, all-zero and all-kept weights."""
    need(isa)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for (n, k), sparsity in zip([(13, 40), (21, 1032), (9, 8), (11, 200), (5, 24), (3, 16), (4, 64)],
                                (0.8, 0.9, 0.5, 0.3, 0.0, 1.0, 0.95)):
        W = weight_unstructured(n, k, gen, dtype, sparsity)
        if n > 4:
            W[1] = 0
            W[-1, :k // 2] = -1.5
        values, mask = bitmask.pack(W)
        y = sparse_cpu.bitmask_unpack(values, mask, isa=isa)
        assert y.dtype == dtype and y.shape == (n, k)
        assert torch.equal(y.view(bits), bitmask.unpack(values, mask).view(bits)), (isa, dtype, n, k)
    with pytest.raises(ValueError, match="padding"):
        sparse_cpu.bitmask_unpack(values[:-1], mask, isa=isa)


def test_bitmask_unpack_op(gen):
    W = weight_unstructured(24, 72, gen, torch.float32, 0.8)
    values, mask = bitmask.pack(W)
    assert torch.equal(torch.ops.prunekit.bitmask_unpack(values, mask), W)
    torch.library.opcheck(torch.ops.prunekit.bitmask_unpack, (values, mask))
    torch.library.opcheck(torch.ops.prunekit.bitmask_unpack, (values.bfloat16(), mask))


def test_bad_input_is_named(gen):
    W = weight_24(8, 16, gen, torch.float32)
    values, meta = torch.ops.prunekit.pack24(W)
    with pytest.raises(TypeError, match="x has dtype"):
        sparse_cpu.s24_linear(torch.randn(2, 16, dtype=torch.bfloat16), values, meta)
    with pytest.raises(ValueError, match="in_features"):
        sparse_cpu.s24_linear(torch.randn(2, 24), values, meta)
    with pytest.raises(ValueError, match="bias"):
        sparse_cpu.s24_linear(torch.randn(2, 16), values, meta, torch.zeros(7))
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        sparse_cpu.s24_linear(torch.randn(2, 16).double(), values.double(), meta)
    bv, bm = bitmask.pack(W)
    with pytest.raises(ValueError, match="padding|at least"):
        sparse_cpu.bitmask_linear(torch.randn(2, 16), bv[:-bitmask.PADDING], bm, bitmask.row_offsets(bm))
    with pytest.raises(ValueError, match="row_offsets"):
        sparse_cpu.bitmask_linear(torch.randn(2, 16), bv, bm, bitmask.row_offsets(bm)[:-1])
