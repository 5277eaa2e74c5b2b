"""The mma.sp decode kernel: CPU emulation of its fragment mapping, and GPU comparisons to the reference."""
import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from prunekit.ops import pack24 as pack_ops
from prunekit.ref import sparse24_fragments as frag
from prunekit.ref import selection


def random_24_weight(n, k, gen, dtype=torch.float32):
    W = torch.randn(n, k, generator=gen)
    W = W * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)
    W[: min(n, 3), :8] = 0  # all-zero groups: explicit zeros in the format
    return W.to(dtype)


def test_a_fragments_cover_every_row_and_group_once():
    seen = Counter()
    for j in range(2):
        for lane in range(32):
            g, t = divmod(lane, 4)
            for dr, L in frag.a_register_groups(t, j):
                seen[(g + dr, L)] += 1
    assert seen == Counter({(r, L): 1 for r in range(16) for L in range(16)})


def test_b_fragments_cover_every_input_once_per_token():
    for g in range(8):
        ks = Counter()
        for j in range(2):
            for t in range(4):
                for r in range(4):
                    k = frag.b_register_k(t, j, r)
                    ks[k] += 1
                    ks[k + 1] += 1
        assert ks == Counter({k: 1 for k in range(64)})


def test_d_fragments_cover_the_tile_once():
    assert sorted(frag.d_register_position(lane, i) for lane in range(32) for i in range(4)) == \
        [(r, n) for r in range(16) for n in range(8)]


def test_metadata_register_selects_the_loaded_groups():
    # lane t's A registers in step j hold slot groups t and t+4; the metadata must describe the same groups
    for j in range(2):
        for t in range(4):
            assert frag.a_register_groups(t, j)[0][1] == frag.logical_group(t, j)
            assert frag.a_register_groups(t, j)[2][1] == frag.logical_group(t + 4, j)
    meta = sum(((L % 6) + 1) << (4 * L) for L in range(16))  # distinct nibble per group (not valid 2:4, only ids)
    e = frag.meta_register(meta, 0, 1, 1)
    assert [(e >> (4 * i)) & 0xF for i in range(4)] == [(frag.logical_group(4 + i, 1) % 6) + 1 for i in range(4)]


@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (3, 40, 128), (11, 17, 64)])
def test_emulated_kernel_reproduces_dense_product(m, n, k, gen):
    W = random_24_weight(n, k, gen)
    values, meta = pack_ops.pack24(W)
    x = torch.randn(m, k, generator=gen)
    y = frag.emulate_linear(x, values, meta)
    torch.testing.assert_close(y, x.double() @ W.double().t())


# ---------------- GPU: the real kernel against the reference ----------------

def _cuda_module():
    from prunekit import _native
    return _native.require_cuda_module()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64])
@pytest.mark.parametrize("n,k", [(16, 64), (40, 128), (257, 192), (1000, 1024), (4096, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_reference(dtype, m, n, k, bias):
    from prunekit.ops import sparse24_dispatch as dispatch

    gen = torch.Generator().manual_seed(m * 1000 + n)
    W = random_24_weight(n, k, gen, dtype)
    values, meta = pack_ops.pack24(W)
    values, meta = values.cuda(), meta.cuda()
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda() if bias else None
    expected = F.linear(x.float(), W.float().cuda(), None if b is None else b.float())
    for splits in (1, 3, None):
        y = dispatch.mma_sp_linear(x, values, meta, b, splits=splits)
        assert y.dtype == dtype and y.shape == (m, n)
        err = (y.float() - expected).abs().max() / expected.abs().max()
        assert err < 1e-2, f"splits={splits}: max rel err {err}"


@pytest.mark.gpu
def test_kernel_exact_on_small_integers():
    # integers small enough that every product and partial sum is exact in fp32: any index slip shows
    gen = torch.Generator().manual_seed(1)
    n, k, m = 48, 256, 13
    W = (torch.randint(-3, 4, (n, k), generator=gen).float()
         * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)).to(torch.bfloat16)
    x = torch.randint(-3, 4, (m, k), generator=gen).to(torch.bfloat16)
    values, meta = pack_ops.pack24(W)
    from prunekit.ops import sparse24_dispatch as dispatch
    y = dispatch.mma_sp_linear(x.cuda(), values.cuda(), meta.cuda(), None, splits=2)
    assert torch.equal(y.float().cpu(), x.float() @ W.float().t())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mma", "dense", "auto"])
def test_sparse_linear_on_cuda_every_mode(mode, monkeypatch):
    from prunekit.nn.sparse_linear import SparseLinear
    from prunekit.ops import sparse24_dispatch as dispatch

    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", mode)
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(512, 384).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(random_24_weight(384, 512, gen, torch.bfloat16))
    sparse = SparseLinear.from_dense(lin).cuda().requires_grad_(False)
    lin = lin.cuda()
    for lead in [(1,), (5,), (2, 3), (64,), (65,), (300,)]:
        x = torch.randn(*lead, 512, generator=gen).to(torch.bfloat16).cuda()
        expected = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        y = sparse(x)
        assert y.shape == (*lead, 384)
        assert float((y.float() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.gpu
def test_triton_pack_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    W = random_24_weight(333, 520, gen, torch.bfloat16)
    v, m = pack_ops.pack24(W)
    vc, mc = pack_ops.pack24(W.cuda())
    assert torch.equal(vc.cpu().view(torch.int16), v.view(torch.int16)) and torch.equal(mc.cpu(), m)
    assert torch.equal(pack_ops.unpack24(vc, mc).cpu(), W)


def test_kernel_declines_empty_weights():
    # N = 0 or K = 0 would reach the kernel's argument check and raise; the dense route handles them
    from prunekit import _native
    from prunekit.ops import sparse24_dispatch as dispatch

    mod = _native.cuda_module()
    if mod is None or not hasattr(mod, "sparse24_decode_gemm"):
        pytest.skip("this build has no CUDA module")
    bf16 = torch.bfloat16
    assert not dispatch.kernel_supports(torch.empty(1, 64, dtype=bf16), torch.empty(0, 32, dtype=bf16))
    assert not dispatch.kernel_supports(torch.empty(1, 0, dtype=bf16), torch.empty(4, 0, dtype=bf16))


@pytest.mark.gpu
def test_kernel_on_views_at_odd_offsets():
    # slices of larger buffers: data_ptr() is then not 16-byte (values), 8-byte (meta) or 4-byte (x) aligned
    from prunekit.ops import sparse24_dispatch as dispatch

    gen = torch.Generator().manual_seed(4)
    n, k, m = 40, 128, 5
    W = random_24_weight(n, k, gen, torch.bfloat16)
    values, meta = pack_ops.pack24(W)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    vbuf = torch.zeros(values.numel() + 1, dtype=values.dtype, device="cuda")
    mbuf = torch.zeros(meta.numel() + 1, dtype=meta.dtype, device="cuda")
    xbuf = torch.zeros(x.numel() + 1, dtype=x.dtype, device="cuda")
    v_view = vbuf[1:].view(values.shape).copy_(values)
    m_view = mbuf[1:].view(meta.shape).copy_(meta)
    x_view = xbuf[1:].view(x.shape).copy_(x)
    y = dispatch.mma_sp_linear(x_view, v_view, m_view, None, splits=2)
    expected = x.float() @ W.float().t()
    assert float((y.float().cpu() - expected).abs().max() / expected.abs().max()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernel_on_a_device_that_is_not_current(monkeypatch):
    # custom ops get no device guard: a layer on cuda:1 is called while cuda:0 is current
    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "mma")
    from prunekit.ops import sparse24_linear  # noqa: F401  (registers the op)

    gen = torch.Generator().manual_seed(5)
    W = random_24_weight(64, 256, gen, torch.bfloat16)
    values, meta = pack_ops.pack24(W)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    with torch.cuda.device(0):
        y = torch.ops.prunekit.sparse24_linear(x.to("cuda:1"), values.to("cuda:1"), meta.to("cuda:1"), None)
        torch.cuda.synchronize(1)
    assert y.device == torch.device("cuda:1")
    expected = x.float() @ W.float().t()
    assert float((y.float().cpu() - expected).abs().max() / expected.abs().max()) < 1e-2


def test_plain_mma_sp_form_for_cuda_before_12_5(tmp_path):
    """CUDA 12.0-12.4 has no mma.sp::ordered_metadata (PTX ISA 8.5): the kernel then emits plain mma.sp
    (as CUTLASS does). Compiled here with the gate forced off, it must emit only the plain form."""
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here")
    root = Path(__file__).resolve().parents[1]
    ptx = tmp_path / "plain.ptx"
    subprocess.run([nvcc, "-std=c++17", f"-I{root / 'csrc/include'}", "-DPRUNEKIT_MMA_SP_ORDERED=0",
                    "-gencode=arch=compute_80,code=compute_80", "-ptx", str(root / "csrc/cuda/sparse24_gemm.cu"),
                    "-o", str(ptx)], check=True, capture_output=True, timeout=300)
    text = ptx.read_text()
    assert "mma.sp.sync.aligned.m16n8k32" in text and "ordered_metadata" not in text


def test_backends_report_the_mma_sp_form():
    from prunekit import _native

    mod = _native.cuda_module()
    if mod is None:
        pytest.skip("this build has no CUDA module")
    info = _native.backends()["cuda"]["sparse24_mma_sp"]
    expected = "mma.sp::ordered_metadata" if mod.CUDA_RUNTIME_VERSION >= 12050 else "mma.sp"
    assert info["form"] == expected and (info["reason"] == "") == (expected != "mma.sp")
