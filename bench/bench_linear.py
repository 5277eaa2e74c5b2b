"""2:4 linear vs dense: `python bench/bench_linear.py [--shapes ..] [--M ..] [--splits ..] [--out DIR]` (needs a
CUDA GPU).

Providers: dense F.linear, torch's to_sparse_semi_structured (where it runs), prunekit SparseLinear
(timed dispatch, `prunekit`), and every kernel registered with the dispatcher, forced: `prunekit_<name>`
(ops/sparse24_dispatch.KERNELS: `mma`, the mma.sp decode kernel, M <= 64; `sm90`, the Hopper CUTLASS GEMM,
M > 64 on compute capability 9.x; decode-kernel variants registered there appear here by themselves).
`--splits S ...` adds `prunekit_mma@sS`: the mma kernel with its split-K count forced (PRUNEKIT_SPARSE24_SPLITS).
`prunekit_v2` (decode kernel v2, M <= 64) is reported per config instead: one row per (variant, blocks
per SM), named like `v2_w8s4c1_b1` (warps, stages, K chunks per stage, blocks per SM; extras give the grid
launched and the most blocks that shared one output tile), so one GPU run autotunes it (`--v2-configs`, e.g.
`2:1 0:2`; default: every compiled variant at 1 and 2 blocks per SM).
Self-checks are off while timing (PRUNEKIT_SELFCHECK=0); each row's rel_err is checked against fp32. Shapes are
out x in features. Decode sizes (M <= 64) rotate through enough weight copies to exceed 3x the L2,
so the weights stream from HBM as in a real model. Writes DIR/bench_linear.json and .md (bench/common.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "14336x4096"]
MS = [1, 16, 64, 256, 1024, 4096, 16384]
BASE_PROVIDERS = ["dense", "torch_24", "prunekit"]


def kernel_providers() -> dict[str, str]:
    """{provider: forced kernel name} for every kernel registered with the dispatcher."""
    try:
        from prunekit.ops import sparse24_dispatch
    except ImportError:  # the bench still parses its arguments without prunekit
        return {"prunekit_mma": "mma", "prunekit_sm90": "sm90"}
    return {f"prunekit_{name}": name for name in sparse24_dispatch.KERNELS}


FORCED = kernel_providers()
# decode v2 is reported per config (v2_cases), not as one forced route
PROVIDERS = BASE_PROVIDERS + [p for p in FORCED if p != "prunekit_v2"] + ["prunekit_v2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", nargs="+", default=SHAPES)
    p.add_argument("--M", nargs="+", type=int, default=MS, dest="ms")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    p.add_argument("--modes", nargs="+", choices=["graph", "eager"], default=["graph", "eager"])
    p.add_argument("--splits", nargs="*", type=int, default=[],
                   help="also time the mma kernel at these forced split-K counts (decode sizes)")
    p.add_argument("--v2-configs", nargs="+", default=None, metavar="VARIANT:BLOCKS_PER_SM",
                   help="decode v2 configs to time (default: every variant at 1 and 2 blocks per SM)")
    common.add_out_arg(p)
    return p.parse_args(argv)


def random_24(n: int, k: int, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(n, k, device=device, dtype=dtype, generator=g)
    order = torch.rand(n, k // 4, 4, device=device, generator=g).argsort(-1)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(-1, order[..., :2], True)
    return W * keep.reshape(n, k)


def weight_copies(n: int, k: int, M: int, device) -> int:
    if M > 64:
        return 1
    dense_bytes = n * k * 2
    return max(1, math.ceil(3 * common.l2_bytes(device) / dense_bytes))


def provider_calls(provider, weights, x, bias):
    """One call per weight copy, or None with a reason when the provider cannot run this case."""
    from prunekit.nn.sparse_linear import SparseLinear

    if provider == "dense":
        return [lambda W=W: F.linear(x, W, bias) for W in weights], None
    if provider == "torch_24":
        try:
            from torch.sparse import to_sparse_semi_structured
            sparse = [to_sparse_semi_structured(W) for W in weights]
            F.linear(x, sparse[0], bias)
        except Exception as exc:  # unsupported GPU/shape/dtype in this torch build
            return None, f"{type(exc).__name__}: {exc}"
        return [lambda S=S: F.linear(x, S, bias) for S in sparse], None
    lin = torch.nn.Linear(weights[0].shape[1], weights[0].shape[0], bias=bias is not None,
                          device=x.device, dtype=x.dtype)
    modules = []
    for W in weights:
        with torch.no_grad():
            lin.weight.copy_(W)
            if bias is not None:
                lin.bias.copy_(bias)
        modules.append(SparseLinear.from_dense(lin).requires_grad_(False))
    if provider.startswith("prunekit_mma") and x.shape[0] > 64:
        return None, "mma.sp kernel is for M <= 64"
    if provider == "prunekit_sm90":
        from prunekit.ops import sparse24_dispatch, sparse24_sm90
        values = modules[0].values
        if not sparse24_sm90.supports(x, values, sparse24_dispatch._bucket(x.shape[0])):
            return None, f"sm90 GEMM not available here ({sparse24_sm90.compiled()[1] or 'needs cc 9.x and M > 64'})"
    return [lambda m=m: m(x) for m in modules], None


def v2_configs(args) -> list[tuple[int, int]]:
    from prunekit.ops import sparse24_decode_v2 as v2

    if not args.v2_configs:
        return v2.configs()
    out = []
    for text in args.v2_configs:
        variant, _, per_sm = text.partition(":")
        if not (variant.isdigit() and per_sm.isdigit() and int(per_sm) >= 1):
            raise SystemExit(f"--v2-configs: expected VARIANT:BLOCKS_PER_SM, got {text!r}")
        out.append((int(variant), int(per_sm)))
    return out


def v2_cases(weights, x, bias, args):
    """[(route name, calls, extras)] for each decode v2 config, or a reason why v2 cannot run here."""
    from prunekit import _native
    from prunekit.nn.sparse_linear import SparseLinear
    from prunekit.ops import sparse24_decode_v2 as v2

    ok, why = v2.compiled()
    if not ok:
        return None, why
    lin = torch.nn.Linear(weights[0].shape[1], weights[0].shape[0], bias=False, device=x.device, dtype=x.dtype)
    packed = []
    for W in weights:
        with torch.no_grad():
            lin.weight.copy_(W)
        m = SparseLinear.from_dense(lin).requires_grad_(False)
        packed.append((m.values, m.meta))
    if not v2.supports(x, packed[0][0]):
        return None, "decode v2 serves M <= 64, bf16/fp16, compute capability >= 8.0"
    n, k = weights[0].shape
    cases = []
    for config in v2_configs(args):
        warps, stages, chunks = v2.variants()[config[0]]
        prep = v2.prepared(*packed[0])
        _, grid = v2._launch(x, prep.weight, prep.locks, bias, n, config)
        plan = v2.plan(n, k, config, grid)
        calls = [lambda v=v, m=m, c=config: _v2_linear(x, v, m, bias, c) for v, m in packed]
        cases.append((v2.name(config), calls, dict(variant=config[0], warps=warps, stages=stages,
                                                   chunks_per_stage=chunks, blocks_per_sm=config[1], grid=grid,
                                                   max_splits=plan.max_splits(),
                                                   max_blocks=_native.require_cuda_module()
                                                   .sparse24_decode_v2_max_blocks(config[0], x.shape[0],
                                                                                  _native.dtype_code(x, "x")))))
    return cases, None


def _v2_linear(x, values, meta, bias, config):
    from prunekit.ops import sparse24_decode_v2 as v2

    return v2.linear(x, values, meta, bias, config=config)


def bench_case(run: dict, shape: str, M: int, dtype, device, args) -> list[dict]:
    n, k = (int(v) for v in shape.split("x"))
    copies = weight_copies(n, k, M, device)
    weights = [random_24(n, k, dtype, device, seed) for seed in range(copies)]
    x = torch.randn(M, k, device=device, dtype=dtype)
    bias = None
    rows = []
    reference = F.linear(x.float(), weights[0].float())
    os.environ["PRUNEKIT_SELFCHECK"] = "0"  # timing only; rel_err below checks every provider's output
    providers = list(args.providers) + [f"prunekit_mma@s{s}" for s in args.splits if M <= 64]
    for provider in providers:
        base, _, splits = provider.partition("@s")
        os.environ["PRUNEKIT_SPARSE24_KERNEL"] = FORCED.get(base, "auto")
        if splits:
            os.environ["PRUNEKIT_SPARSE24_SPLITS"] = splits
        else:
            os.environ.pop("PRUNEKIT_SPARSE24_SPLITS", None)
        if base == "prunekit_v2":
            cases, why = v2_cases(weights, x, bias, args) if M <= 64 else (None, "decode v2 is for M <= 64")
        else:
            calls, why = provider_calls(base, weights, x, bias)
            cases = None if calls is None else [(provider, calls, {})]
        if cases is None:
            print(f"skip {provider} {shape} M={M}: {why}", file=sys.stderr)
            continue
        for name, calls, extras in cases:
            out = calls[0]()
            err = float((out.float() - reference).norm() / reference.norm())
            for mode in args.modes:
                try:
                    timing = common.time_calls(calls, graph=(mode == "graph"))
                except RuntimeError as exc:  # e.g. a provider that cannot be captured in a graph
                    print(f"skip {name} {shape} M={M} {mode}: {exc}", file=sys.stderr)
                    continue
                weight_bytes = n * k * 2 if provider == "dense" else n * k * 2 * (0.5 + 1 / 16)
                rows.append(common.row(run, "linear", name, shape=shape, dtype=dtype, M=M, mode=mode,
                                       timing=timing, flops=2.0 * M * n * k,
                                       bytes_moved=weight_bytes + (M * k + M * n) * 2,
                                       rel_err=err, weight_copies=copies, **extras))
    for name in ("PRUNEKIT_SPARSE24_KERNEL", "PRUNEKIT_SPARSE24_SPLITS", "PRUNEKIT_SELFCHECK"):
        os.environ.pop(name, None)
    add_vs_dense(rows)
    return rows


def add_vs_dense(rows: list[dict]) -> None:
    """extras.vs_dense = dense time / this time, for rows whose case and mode also timed dense."""
    dense = {(r["shape"], r["M"], r["mode"]): r["time_us"] for r in rows if r["provider"] == "dense"}
    for r in rows:
        base = dense.get((r["shape"], r["M"], r["mode"]))
        if base is not None:
            r["extras"]["vs_dense"] = round(base / r["time_us"], 3)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.require_cuda("bench_linear")
    dtype = getattr(torch, args.dtype)
    run = common.run_info("bench_linear", device, argv)
    rows: list[dict] = []
    for shape in args.shapes:
        for M in args.ms:
            rows += bench_case(run, shape, M, dtype, device, args)
            torch.cuda.empty_cache()
            common.write_results(args.out, "bench_linear", run, rows)  # keep what is done if a later case fails
    print(common.results_table.render(run, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
