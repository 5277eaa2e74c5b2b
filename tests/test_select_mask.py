"""Selection ops: C++ (CPU op) and Triton (interpreter on CPU, CUDA on the GPU machine) against the
stable-sort oracle of prunekit/ref/selection.py, ties included."""
import pytest
import torch

import prunekit._native as native
from prunekit.kernels import select_mask as tk
from prunekit.ops import select_mask  # noqa: F401  (registers the ops)
from prunekit.ref import selection
from prunekit.ref.wanda import wanda_prune_mask

ops = torch.ops.prunekit


def tie_scores(gen, rows, width, levels=4):
    """Integer-valued scores (many ties), a row of negatives and signed zeros."""
    s = torch.randint(0, levels, (rows, width), generator=gen).float()
    s[0] = -s[0]
    s[-1, : width // 3] = -0.0
    return s


def random_scores(gen, rows, width):
    return torch.rand(rows, width, generator=gen) * torch.logspace(-4, 4, width)


# ---- C++ kernels through the CPU ops ----

def test_cpu_module_has_the_selection_kernels():
    mod = native.require_cpu_module()
    assert all(hasattr(mod, f) for f in ("row_keep_mask", "nm_keep_mask", "wanda_keep_mask"))


@pytest.mark.parametrize("width", [1, 37, 257])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99])
def test_row_keep_mask_cpu_matches_reference(gen, width, sparsity):
    for scores in (tie_scores(gen, 5, width), random_scores(gen, 9, width)):
        keep = ops.row_keep_mask(scores, sparsity)
        assert keep.dtype == torch.bool
        assert torch.equal(keep, selection.row_keep_mask(scores, sparsity))
        assert torch.all((~keep).sum(1) == int(width * sparsity))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_row_keep_mask_cpu_other_dtypes(gen, dtype):
    scores = random_scores(gen, 6, 129).to(dtype)
    assert torch.equal(ops.row_keep_mask(scores, 0.6), selection.row_keep_mask(scores, 0.6))


def test_row_keep_mask_one_long_row_with_ties(gen):
    scores = torch.randint(0, 50, (1, 20001), generator=gen).float()
    assert torch.equal(ops.row_keep_mask(scores, 0.5), selection.row_keep_mask(scores, 0.5))


@pytest.mark.parametrize("n,m,width", [(2, 4, 36), (1, 4, 256), (4, 8, 64), (3, 6, 42), (2, 4, 4)])
def test_nm_keep_mask_cpu_matches_reference(gen, n, m, width):
    for scores in (tie_scores(gen, 7, width, levels=3), random_scores(gen, 5, width)):
        keep = ops.nm_keep_mask(scores, n, m)
        assert torch.equal(keep, selection.nm_keep_mask(scores, n, m))
        assert torch.all(keep.reshape(keep.shape[0], -1, m).sum(-1) == n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("pattern", [(0.5, 0, 0), (0.3, 0, 0), (0.0, 2, 4), (0.0, 1, 4), (0.0, 4, 8)])
def test_wanda_keep_mask_cpu_matches_transcription(gen, dtype, pattern):
    sparsity, n, m = pattern
    W = torch.randn(31, 256, generator=gen).to(dtype)
    norms = torch.rand(256, generator=gen) * torch.logspace(-3, 3, 256)
    keep = ops.wanda_keep_mask(W, norms, sparsity, n, m)
    expected = ~wanda_prune_mask(W, norms, sparsity, m - n if m else 0, m)
    assert torch.equal(keep, expected)


def test_wanda_keep_mask_cpu_half_subnormals_and_ties(gen):
    # float16 subnormals exercise the C++ half decoding; integer weights with equal norms tie.
    W = torch.tensor([[6e-8, -6e-8, 1e-6, 3e-5, -1e-6, 0.0, 65504.0, -2.0]] * 3, dtype=torch.float16)
    norms = torch.ones(8)
    for sparsity in (0.25, 0.5, 0.75):
        expected = selection.row_keep_mask(W.abs().float(), sparsity)
        assert torch.equal(ops.wanda_keep_mask(W, norms, sparsity, 0, 0), expected)
    Wt = torch.randint(-3, 4, (6, 40), generator=gen).to(torch.bfloat16)
    assert torch.equal(ops.wanda_keep_mask(Wt, torch.ones(40), 0.0, 2, 4),
                       selection.nm_keep_mask(Wt.abs().float(), 2, 4))
    assert torch.equal(ops.wanda_keep_mask(Wt, torch.ones(40), 0.45, 0, 0),
                       selection.row_keep_mask(Wt.abs().float(), 0.45))


def test_cpu_kernel_rejects_bad_sizes():
    mod = native.require_cpu_module()
    s = torch.zeros(2, 8)
    keep = torch.empty(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="row_keep_mask"):
        mod.row_keep_mask(s.data_ptr(), keep.data_ptr(), 2, 8, 9)
    with pytest.raises(ValueError, match="nm_keep_mask"):
        mod.nm_keep_mask(s.data_ptr(), keep.data_ptr(), 2, 8, 2, 3)
    with pytest.raises(RuntimeError, match="unsupported"):
        mod.wanda_keep_mask(s.data_ptr(), 3, s.data_ptr(), keep.data_ptr(), 2, 8, 4, 0, 0)


# ---- op contract ----

def test_opcheck_every_op(gen):
    scores = random_scores(gen, 4, 24)
    W = torch.randn(4, 24, generator=gen)
    norms = torch.rand(24, generator=gen)
    torch.library.opcheck(ops.row_keep_mask, (scores, 0.5))
    torch.library.opcheck(ops.nm_keep_mask, (scores, 2, 4))
    torch.library.opcheck(ops.wanda_keep_mask, (W, norms, 0.5, 0, 0))
    torch.library.opcheck(ops.wanda_keep_mask, (W.half(), norms, 0.0, 1, 4))
    torch.library.opcheck(ops.tensor_keep_mask, (scores, 0.3))


@pytest.mark.parametrize("shape", [(1, 1), (37, 128), (5, 7), (130, 24)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_tensor_keep_mask_matches_reference_with_ties(gen, shape, sparsity):
    # kth-value select vs the stable sort: random scores, heavy integer ties, and signed zeros
    ties = torch.randint(0, 4, shape, generator=gen).float()
    ties[..., ::3] *= -0.0
    for scores in (random_scores(gen, *shape), ties, ties.double()):
        got = ops.tensor_keep_mask(scores, sparsity)
        assert torch.equal(got, selection.tensor_keep_mask(scores, sparsity))
        assert int((~got).sum()) == int(scores.numel() * sparsity)


def test_op_errors():
    s = torch.rand(3, 12)
    with pytest.raises(TypeError, match="floating-point"):
        ops.row_keep_mask(torch.ones(3, 12, dtype=torch.int32), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.row_keep_mask(s, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.row_keep_mask(s, -0.1)
    with pytest.raises(ValueError, match="2-D"):
        ops.row_keep_mask(torch.rand(12), 0.5)
    with pytest.raises(ValueError, match="divisible by M=5"):
        ops.nm_keep_mask(s, 2, 5)
    with pytest.raises(ValueError, match="1 <= N < M"):
        ops.nm_keep_mask(s, 4, 4)
    with pytest.raises(ValueError, match="act_norm_sq: expected shape"):
        ops.wanda_keep_mask(s, torch.rand(11), 0.5, 0, 0)
    with pytest.raises(ValueError, match="meta"):
        ops.wanda_keep_mask(s, torch.rand(12, device="meta"), 0.5, 0, 0)


# ---- Triton under the interpreter (small shapes: it is slow) ----

@pytest.mark.parametrize("rows,width", [(3, 37), (5, 64), (2, 257)])
def test_row_keep_mask_triton_matches_reference(gen, rows, width):
    for scores in (tie_scores(gen, rows, width), random_scores(gen, rows, width).half()):
        for sparsity in (0.0, 0.5, 0.9):
            expected = selection.row_keep_mask(scores, sparsity)
            assert torch.equal(tk.row_keep_mask_triton(scores, sparsity), expected)


def test_row_keep_mask_triton_chunked_path(gen):
    # Rows wider than the register block take the chunked search with carried tie ranks.
    scores = tie_scores(gen, 3, 45, levels=3)
    for sparsity in (0.2, 0.5, 0.95):
        assert torch.equal(tk.row_keep_mask_triton(scores, sparsity, max_block=16),
                           selection.row_keep_mask(scores, sparsity))


@pytest.mark.parametrize("n,m,width", [(2, 4, 36), (1, 4, 64), (4, 8, 40), (3, 6, 30)])
def test_nm_keep_mask_triton_matches_reference(gen, n, m, width):
    scores = tie_scores(gen, 5, width, levels=3)
    assert torch.equal(tk.nm_keep_mask_triton(scores, n, m), selection.nm_keep_mask(scores, n, m))
    scores = random_scores(gen, 3, width).to(torch.bfloat16)
    assert torch.equal(tk.nm_keep_mask_triton(scores, n, m), selection.nm_keep_mask(scores, n, m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wanda_keep_mask_triton_matches_transcription(gen, dtype):
    W = torch.randn(6, 40, generator=gen).to(dtype)
    norms = torch.rand(40, generator=gen) * torch.logspace(-2, 2, 40)
    for sparsity, n, m in ((0.5, 0, 0), (0.0, 2, 4), (0.0, 4, 8)):
        expected = ~wanda_prune_mask(W, norms, sparsity, m - n if m else 0, m)
        assert torch.equal(tk.wanda_keep_mask_triton(W, norms, sparsity, n, m), expected)
    assert torch.equal(tk.wanda_keep_mask_triton(W, norms, 0.35, max_block=16),
                       ~wanda_prune_mask(W, norms, 0.35))


def test_wanda_keep_mask_triton_ties(gen):
    W = torch.randint(-3, 4, (4, 24), generator=gen).float()
    norms = torch.ones(24)
    assert torch.equal(tk.wanda_keep_mask_triton(W, norms, 0.5), selection.row_keep_mask(W.abs(), 0.5))
    assert torch.equal(tk.wanda_keep_mask_triton(W, norms, n=2, m=4), selection.nm_keep_mask(W.abs(), 2, 4))


# ---- CUDA (GPU machine) ----

@pytest.mark.gpu
def test_tensor_keep_mask_cuda(gen):
    for scores in (random_scores(gen, 4096, 128), torch.randint(0, 9, (4096, 128), generator=gen).float()):
        got = ops.tensor_keep_mask(scores.cuda(), 0.5).cpu()
        assert torch.equal(got, selection.tensor_keep_mask(scores, 0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,width", [(64, 4096), (33, 11008), (7, 20001)])
def test_row_keep_mask_cuda(gen, rows, width):
    for scores in (random_scores(gen, rows, width), torch.randint(0, 20, (rows, width), generator=gen).float()):
        for sparsity in (0.5, 0.7):
            got = ops.row_keep_mask(scores.cuda(), sparsity).cpu()
            assert torch.equal(got, selection.row_keep_mask(scores, sparsity))


@pytest.mark.gpu
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_keep_mask_cuda(gen, n, m):
    scores = torch.randint(0, 5, (129, 1024), generator=gen).float()
    assert torch.equal(ops.nm_keep_mask(scores.cuda(), n, m).cpu(), selection.nm_keep_mask(scores, n, m))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [(0.5, 0, 0), (0.0, 2, 4), (0.0, 4, 8)])
def test_wanda_keep_mask_cuda_matches_transcription(gen, dtype, pattern):
    sparsity, n, m = pattern
    W = torch.randn(512, 4096, generator=gen).to(dtype)
    norms = torch.rand(4096, generator=gen) * torch.logspace(-3, 3, 4096)
    expected = ~wanda_prune_mask(W, norms, sparsity, m - n if m else 0, m)
    assert torch.equal(ops.wanda_keep_mask(W.cuda(), norms.cuda(), sparsity, n, m).cpu(), expected)


@pytest.mark.gpu
def test_wanda_keep_mask_cuda_chunked_rows(gen):
    W = torch.randn(16, 3000, generator=gen).cuda()
    norms = torch.rand(3000, generator=gen).cuda()
    expected = ~wanda_prune_mask(W, norms, 0.5)
    assert torch.equal(tk.wanda_keep_mask_triton(W, norms, 0.5, max_block=1024), expected)


# ---- compile-only check of the CUDA path (the interpreter never runs Triton's compiler) ----

_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prunekit.kernels import select_mask as k

def compile_for_sm90(fn, signature, constexprs, num_warps):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

common = {"src_ptr": "*bf16", "sqrt_norm_ptr": "*fp32", "keep_ptr": "*u8"}
compile_for_sm90(k._nm_kernel, {**common, "rows": "i32", "width": "i32", "N": "constexpr", "M": "constexpr",
                 "FUSED": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
                 {"N": 2, "M": 4, "FUSED": True, "BLOCK_R": 16, "BLOCK_C": 256}, 4)
row = {**common, "width": "i32", "n_prune": "i32", "FUSED": "constexpr", "ONE_CHUNK": "constexpr", "BLOCK": "constexpr"}
compile_for_sm90(k._row_kernel, row, {"FUSED": True, "ONE_CHUNK": True, "BLOCK": 4096}, 4)
compile_for_sm90(k._row_kernel, {**row, "src_ptr": "*fp32"}, {"FUSED": False, "ONE_CHUNK": False, "BLOCK": 1024}, 4)
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
