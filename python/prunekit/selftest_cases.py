"""The grid of `prunekit selftest` (selftest.py): per op, the routes that exist on the device, on odd
sizes, tails, ties and all-zero groups, each against the op's PyTorch reference on the same inputs.
Tolerances are those of the first-use self-checks (ops/selfcheck.py): exact for masks and packing."""
from __future__ import annotations

import os

import torch

from .ops import selfcheck
from .selftest import Case

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sparse24(rows: int, k: int, dtype, device, seed: int) -> torch.Tensor:
    """A 2:4 weight with all-zero groups (rows 0-1, first 8 inputs) and one-nonzero groups (row 2)."""
    from .ref import selection

    g = _gen(seed)
    W = torch.randn(rows, k, generator=g) * selection.nm_keep_mask(torch.rand(rows, k, generator=g), 2, 4)
    W[:2, :8] = 0
    if rows > 2:
        W[2, 1::4] = 0
    return W.to(device=device, dtype=dtype)


def _ties(rows: int, width: int, device, seed: int) -> torch.Tensor:
    """Scores with many ties (small integers), the case selection kernels get wrong most easily."""
    return torch.randint(0, 4, (rows, width), generator=_gen(seed)).float().to(device)


def _triton(device) -> str:
    """'' when Triton kernels can run on `device`, else why not."""
    from . import _native

    ok, why = _native.triton_available()
    if not ok:
        return f"Triton not importable ({why})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton on CPU needs TRITON_INTERPRET=1 before triton is imported"
    return ""


def _skip_or(why: str, fn):
    return None if why else fn


def all_cases(device) -> list[Case]:
    cases: list[Case] = []
    for build in (_pack_cases, _select_cases, _calib_cases, _sweep_cases, _linear_cases, _cpu_sparse_cases):
        cases += build(device)
    return cases


# ---- pack / unpack ----

def _pack_cases(device) -> list[Case]:
    from .ops import pack24 as ops
    from .ref import pack24 as ref

    cases = []
    tri = _triton(device)
    for rows, k, dtype in ((1, 8, torch.float32), (7, 24, torch.bfloat16), (33, 136, torch.float16),
                           (5, 264, torch.float32)):
        W = _sparse24(rows, k, dtype, device, seed=rows)
        values, meta = ref.pack24(W)
        shape, dt = f"{rows}x{k}", _DTYPES[dtype]
        routes = []
        if device.type == "cpu":
            routes.append(("c++", lambda W=W: torch.ops.prunekit.pack24(W),
                           lambda v=values, m=meta: torch.ops.prunekit.unpack24(v, m), ""))
        routes.append(("triton", lambda W=W: ops.triton_pack24(W),
                       lambda v=values, m=meta: ops.triton_unpack24(v, m), tri))
        for name, pack, unpack, why in routes:
            cases.append(Case("pack24", name, shape, dt, _skip_or(why, pack), lambda W=W: ref.pack24(W),
                              selfcheck.exact, why))
            cases.append(Case("unpack24", name, shape, dt, _skip_or(why, unpack),
                              lambda v=values, m=meta: ref.unpack24(v, m), selfcheck.exact, why))
    return cases


# ---- selection ----

def _select_cases(device) -> list[Case]:
    from .ops import select_mask as ops
    from .ref import selection

    cases = []
    tri = _triton(device)
    kernels = None
    if not tri:
        from .kernels import select_mask as kernels
    for rows, width, n, m, sparsity in ((5, 16, 2, 4, 0.5), (13, 40, 4, 8, 0.3), (3, 1000, 2, 4, 0.7),
                                         (2, 5000, 1, 4, 0.5)):
        scores = _ties(rows, width, device, seed=width)
        W = torch.randn(rows, width, generator=_gen(width)).to(device)
        norm = torch.rand(width, generator=_gen(width + 1)).to(device)
        norm[: width // 8] = 0  # dead inputs: all-zero scores in those columns
        shape = f"{rows}x{width}"
        plan = [("nm_keep_mask", f"{n}:{m}", lambda s=scores: selection.nm_keep_mask(s, n, m),
                 lambda s=scores: torch.ops.prunekit.nm_keep_mask(s, n, m),
                 lambda s=scores: kernels.nm_keep_mask_triton(s, n, m)),
                ("row_keep_mask", f"{sparsity:g}", lambda s=scores: selection.row_keep_mask(s, sparsity),
                 lambda s=scores: torch.ops.prunekit.row_keep_mask(s, sparsity),
                 lambda s=scores: kernels.row_keep_mask_triton(s, sparsity)),
                ("wanda_keep_mask", f"{n}:{m}", lambda W=W, a=norm: ops._wanda_reference(W, a, 0.0, n, m),
                 lambda W=W, a=norm: torch.ops.prunekit.wanda_keep_mask(W, a, 0.0, n, m),
                 lambda W=W, a=norm: kernels.wanda_keep_mask_triton(W, a, 0.0, n, m)),
                ("wanda_keep_mask", f"{sparsity:g}", lambda W=W, a=norm: ops._wanda_reference(W, a, sparsity, 0, 0),
                 lambda W=W, a=norm: torch.ops.prunekit.wanda_keep_mask(W, a, sparsity, 0, 0),
                 lambda W=W, a=norm: kernels.wanda_keep_mask_triton(W, a, sparsity, 0, 0))]
        for op, pattern, reference, cpp, triton_fn in plan:
            label = f"{shape} {pattern}"
            if device.type == "cpu":
                cases.append(Case(op, "c++", label, "fp32", cpp, reference, selfcheck.exact))
            cases.append(Case(op, "triton", label, "fp32", _skip_or(tri, triton_fn), reference, selfcheck.exact, tri))
    return cases


# ---- calibration statistics ----

def _calib_cases(device) -> list[Case]:
    from .ops import calib_stats as ops
    from .ref import calib_stats as ref

    cases = []
    tri = _triton(device)
    for rows, cols, dtype in ((37, 19, torch.float32), (300, 130, torch.bfloat16), (1, 8, torch.float16)):
        x = torch.randn(rows, cols, generator=_gen(rows)).to(device=device, dtype=dtype)
        x[:, 3] = 0  # a dead input
        norm = torch.rand(cols, generator=_gen(cols)).to(device)
        H = torch.eye(cols, device=device)
        shape, dt = f"{rows}x{cols}", _DTYPES[dtype]
        cases.append(Case("act_norm_sq_update", "triton", shape, dt,
                          _skip_or(tri, lambda x=x, a=norm: ops._triton_norm_update(x, a, 5, rows)),
                          lambda x=x, a=norm: ref.act_norm_sq_update(x, a, 5, rows), ops.COMPARE, tri))
        why = ""
        if device.type != "cuda":
            why = "the tensor-core Hessian runs on CUDA only"
        elif dtype not in ops.HALF_DTYPES:
            why = "fp32 activations use the reference"
        elif not ops.tensor_core_hessian_available():
            why = f"torch {torch.__version__} has no addmm out_dtype"
        cases.append(Case("hessian_update", "tensor_core", shape, dt,
                          _skip_or(why, lambda x=x, H=H: ops._tensor_core_hessian(x, H, 5, rows)),
                          lambda x=x, H=H: ref.hessian_update(x, H, 5, rows), ops.COMPARE, why))
    return cases


# ---- SparseGPT's block sweep ----

def _sweep_inputs(rows, B, n, m, device, seed):
    g = _gen(seed)
    W = torch.randn(rows, B, generator=g)
    W[0] = 0  # an all-zero row
    X = torch.randn(2 * B + 3, B, generator=g)
    H = X.t() @ X / X.shape[0] + 0.05 * torch.eye(B)
    U = torch.linalg.cholesky(torch.linalg.inv(H.double()), upper=True).float().contiguous()
    if m:
        keep = torch.zeros(rows, B, dtype=torch.bool)
    else:
        from .ref import selection

        keep = selection.tensor_keep_mask(W ** 2 / torch.diag(U).reshape(1, -1) ** 2, 0.5)
    return W.to(device), U.to(device), keep.to(device)


def _sweep_cases(device) -> list[Case]:
    from . import _native
    from .ops import obs_sweep as ops
    from .ref import obs_sweep as ref

    cases = []
    tri = _triton(device)
    grid = [(37, 16, 2, 4), (5, 7, 0, 0), (9, 32, 0, 0)]
    if device.type == "cuda":
        grid += [(130, 128, 2, 4), (1000, 128, 0, 0), (33, 96, 4, 8)]
    cuda_mod = _native.cuda_module() if device.type == "cuda" else None
    for rows, B, n, m in grid:
        W, U, keep = _sweep_inputs(rows, B, n, m, device, seed=rows + B)
        label = f"{rows}x{B} {f'{n}:{m}' if m else 'mask'}"
        args = (W, U, keep, n, m)
        reference = lambda a=args: ref.obs_sweep(*a)  # noqa: E731
        if device.type == "cpu":
            cases.append(Case("obs_sweep", "c++", label, "fp32",
                              lambda a=args: ops._native_sweep(_native.require_cpu_module(), *a), reference,
                              ops.COMPARE))
        else:
            why = "" if cuda_mod is not None and hasattr(cuda_mod, "obs_sweep") else \
                f"prunekit._C_cuda has no obs_sweep ({_native._errors.get('_C_cuda', 'older build')})"
            cases.append(Case("obs_sweep", "cuda", label, "fp32",
                              _skip_or(why, lambda a=args: ops._cuda_sweep(cuda_mod, *a)), reference, ops.COMPARE, why))
        cases.append(Case("obs_sweep", "triton", label, "fp32", _skip_or(tri, lambda a=args: ops._triton_sweep(*a)),
                          reference, ops.COMPARE, tri))
    return cases


# ---- 2:4 linear ----

def _linear_cases(device) -> list[Case]:
    import torch.nn.functional as F

    from .ops import sparse24_dense
    from .ref import pack24 as ref_pack

    cases = []
    if device.type == "cpu":
        grid = [(1, 40, 64, torch.float32, True), (5, 17, 136, torch.float32, False), (3, 24, 64, torch.bfloat16, True)]
    else:
        grid = [(M, N, K, dtype, bias) for M in (1, 7, 16, 33, 64) for (N, K) in ((136, 128), (257, 320))
                for dtype in (torch.bfloat16,) for bias in (True,)]
        grid += [(M, N, 512, torch.float16, False) for M in (3, 64) for N in (200,)]
        grid += [(M, N, K, torch.bfloat16, True) for M in (128, 257) for (N, K) in ((256, 512), (1000, 4096))]
    for M, N, K, dtype, has_bias in grid:
        W = _sparse24(N, K, dtype, device, seed=N + K)
        values, meta = ref_pack.pack24(W)
        g = _gen(M + N)
        x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
        bias = torch.randn(N, generator=g).to(device=device, dtype=dtype) if has_bias else None
        label = f"M={M} {N}x{K}{' +bias' if has_bias else ''}"
        reference = lambda x=x, W=W, b=bias: F.linear(x.float(), W.float(), None if b is None else b.float())  # noqa: E731
        compare = _linear_compare(x, W)
        cases.append(Case("sparse24_linear", "dense", label, _DTYPES[dtype],
                          lambda x=x, v=values, m=meta, b=bias: sparse24_dense.linear(x, v, m, b).float(),
                          reference, compare))
        if device.type == "cuda":
            cases += _kernel_cases(x, values, meta, bias, label, reference, compare)
    return cases


# ---- the CPU sparse linear kernels (ops/sparse_cpu.py), every ISA path this CPU runs ----

CPU_ISAS = ("scalar", "avx2", "avx512", "avx512bf16")
CPU_MS = (1, 3, 17, 70)  # the M = 1 kernel, the few-token kernel, the tile kernels (bf16: its own), M > 64


def _cpu_sparse_cases(device) -> list[Case]:
    """2:4 and bitmask (80% unstructured, with empty and full rows) weights, fp32/bf16/fp16, on odd shapes, per
    ISA (and the bitmask unpack, exact): the paths a user's CPU takes (AVX2-only CPUs never run the AVX-512
    code tested in CI, and vice versa).
    Tolerance per output feature, relative to |y| + |x|·|w|: 1e-5 in fp32, 1e-2 in bf16/fp16."""
    import torch.nn.functional as F

    from .ops import sparse_cpu
    from .ref import bitmask
    from .ref import pack24 as ref_pack

    if device.type != "cpu":
        return []
    if not sparse_cpu.available():
        return [Case("sparse_cpu_linear", "c++", "-", "-", None, lambda: None, selfcheck.exact,
                     "prunekit._C has no sparse_linear_cpu (prunekit backends says why)")]
    cases = []
    N, K = 37, 136
    why = {isa: "" if sparse_cpu.isa_supported(isa) else f"this CPU has no {isa}" for isa in CPU_ISAS}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        W24 = _sparse24(N, K, dtype, device, seed=K)
        g = _gen(N)
        Wu = (torch.randn(N, K, generator=g) * (torch.rand(N, K, generator=g) >= 0.8)).to(dtype)
        Wu[3] = 0
        Wu[4] = torch.randn(K, generator=g).to(dtype)
        v24, m24 = ref_pack.pack24(W24)
        vu, mu = bitmask.pack(Wu)
        ru = bitmask.row_offsets(mu)
        bias = torch.randn(N, generator=g).to(dtype)
        s24 = lambda x, isa, v=v24, m=m24, b=bias: sparse_cpu.s24_linear(x, v, m, b, isa=isa)  # noqa: E731
        bm = lambda x, isa, v=vu, m=mu, r=ru, b=bias: sparse_cpu.bitmask_linear(x, v, m, r, b, isa=isa)  # noqa: E731
        for isa in CPU_ISAS:  # the bitmask unpack (the dense side of the route), bit-exact
            cases.append(Case("bitmask_unpack", f"c++ {isa}", f"{N}x{K} u80", _DTYPES[dtype],
                              _skip_or(why[isa], lambda v=vu, m=mu, i=isa: sparse_cpu.bitmask_unpack(v, m, isa=i)),
                              lambda v=vu, m=mu: bitmask.unpack(v, m), selfcheck.exact, why[isa]))
        for fmt, W, run in (("2:4", W24, s24), ("u80", Wu, bm)):
            for M in CPU_MS:
                x = torch.randn(M, K, generator=_gen(M)).to(dtype)
                compare = _cpu_compare(x, W, tol)
                reference = lambda x=x, W=W, b=bias: F.linear(x.float(), W.float(), b.float())  # noqa: E731
                for isa in CPU_ISAS:
                    cases.append(Case("sparse_cpu_linear", f"c++ {isa}", f"M={M} {N}x{K} {fmt}", _DTYPES[dtype],
                                      _skip_or(why[isa], lambda x=x, r=run, i=isa: r(x, i).float()), reference,
                                      compare, why[isa]))
    return cases


def _cpu_compare(x, W, tol):
    from .ops import sparse24_dispatch

    compare = sparse24_dispatch._compare(x, W)

    def within(got, expected):
        err, _ = compare(got, expected)
        return err, f"max per-feature rel err {err:.3g} (tolerance {tol:g})"
    within.tolerance = tol
    return within


def _linear_compare(x, W):
    from .ops import sparse24_dispatch

    compare = sparse24_dispatch._compare(x, W)
    return compare


def _kernel_cases(x, values, meta, bias, label, reference, compare) -> list[Case]:
    """Every registered 2:4 kernel (mma decode, sm90, and any variant registered later) on this case."""
    from .ops import sparse24_dispatch as dispatch

    cases = []
    bucket = dispatch._bucket(x.shape[0])
    for name, kernel in dispatch.KERNELS.items():
        try:
            supported = kernel.supports(x, values, bucket)
            why = "" if supported else "not supported for this shape/dtype/device or not built"
        except Exception as exc:  # noqa: BLE001 - a broken support check is a failure to report, not a crash
            supported, why = False, f"supports() raised {type(exc).__name__}: {exc}"
        if name == "sm90" and not supported:
            from .ops import sparse24_sm90

            built, reason = sparse24_sm90.compiled()
            if not built:
                why = f"not built: {reason}"
            elif x.shape[0] < sparse24_sm90.MIN_TOKENS:
                continue  # a prefill kernel: not a decode case
        elif name == "mma" and not supported and x.shape[0] > 64:
            continue  # a decode kernel: not a prefill case
        cases.append(Case("sparse24_linear", name, label, _DTYPES[values.dtype],
                          _skip_or(why, lambda x=x, v=values, m=meta, b=bias, k=kernel: k.fn(x, v, m, b).float()),
                          reference, compare, why))
    return cases
