"""One call of each hand-written 2:4 CUDA kernel, for `compute-sanitizer --tool memcheck` (bench/run_gpu.sh):
the mma.sp decode kernel (odd N and a tail of tokens) and, on compute capability 9.x with the sm90 GEMM
built, the CUTLASS sm90 GEMM (compressor included). Self-checks off: exactly these launches run. Each
output is compared with F.linear in fp32; exit 1 on a wrong result, 2 without a GPU."""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

os.environ["PRUNEKIT_SELFCHECK"] = "0"


def weight(n: int, k: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(n, k, device=device, generator=g)
    order = torch.rand(n, k // 4, 4, device=device, generator=g).argsort(-1)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(-1, order[..., :2], True)
    return (W * keep.reshape(n, k)).bfloat16()


def check(name: str, y: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> bool:
    ref = F.linear(x.float(), W.float())
    err = float((y.float() - ref).norm() / ref.norm())
    print(f"{name}: y {tuple(y.shape)} rel err {err:.3g}")
    return err < 2e-2


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_calls: needs a CUDA GPU", file=sys.stderr)
        return 2
    from prunekit.ops import pack24, sparse24_dispatch, sparse24_sm90

    device = torch.device("cuda")
    ok = True
    W = weight(1000, 512, device)
    values, meta = pack24.ref.pack24(W)
    x = torch.randn(7, 512, device=device).bfloat16()
    ok &= check("mma decode M=7 N=1000 K=512", sparse24_dispatch.mma_sp_linear(x, values, meta, None), x, W)
    torch.cuda.synchronize()
    W2 = weight(256, 512, device)
    v2, m2 = pack24.ref.pack24(W2)
    x2 = torch.randn(128, 512, device=device).bfloat16()
    if sparse24_sm90.supports(x2, v2, 128):
        ok &= check("sm90 M=128 N=256 K=512", sparse24_sm90.linear(x2, v2, m2, None), x2, W2)
    else:
        print(f"sm90: not run here ({sparse24_sm90.compiled()[1] or 'needs compute capability 9.x'})")
    torch.cuda.synchronize()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
