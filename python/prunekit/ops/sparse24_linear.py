"""Custom op `prunekit::sparse24_linear(x, values, meta, bias?) -> y`: y = x @ W.T + bias with W in the
logical 2:4 format (ref/pack24.py), any leading dims on x.

CPU: the C++ SIMD 2:4 kernel (ops/sparse_cpu.py) or dense F.linear on the cached unpacked weight, chosen
per (shape, dtype, M bucket) by a one-time timing (ops/sparse_cpu_route.py). CUDA: ops/sparse24_dispatch.py
picks per (device, shape, dtype, M bucket) between the mma.sp decode kernel (csrc/cuda/sparse24_gemm.cu), the
sm90 GEMM and that cached dense route, by a one-time timing per process. The default body stays the pure
reference (no cache). Autograd: gradients for x, the kept values (masked dense backward: the
pattern in `meta` is fixed) and bias.
"""
from __future__ import annotations

import torch

from ..ref import pack24 as ref_pack
from ..ref import sparse24_linear as ref
from . import sparse24_dense, sparse_cpu, sparse_cpu_route


@torch.library.custom_op("prunekit::sparse24_linear", mutates_args=())
def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    return ref.sparse24_linear(x, values, meta, bias)


@sparse24_linear.register_fake
def _(x, values, meta, bias=None):
    ref.check_inputs(x, values, meta, bias)
    return x.new_empty(*x.shape[:-1], values.shape[0])


@sparse24_linear.register_kernel("cpu")
def _(x, values, meta, bias=None):
    ref.check_inputs(x, values, meta, bias)
    return _cpu_linear(x, values, meta, bias)


def _cpu_linear(x, values, meta, bias):
    """The C++ SIMD kernel or dense F.linear (ops/sparse_cpu_route.py). Called through this op (functional
    use, torch.compile) a dense choice uses the cached unpacked copy next to the packed one; SparseLinear's
    eager forward instead turns itself dense so that one copy remains (nn/cpu_route.py)."""
    N, K = values.shape[0], 2 * values.shape[1]
    choice = sparse_cpu_route.decide("2:4", x.reshape(-1, K), N, bias is not None,
                                     lambda p: sparse_cpu.s24_linear(p, values, meta, bias),
                                     lambda: sparse24_dense.unpack(values, meta), bias, (values, meta))
    if choice == "dense":
        return sparse24_dense.linear(x, values, meta, bias)
    return sparse_cpu.s24_linear(x, values, meta, bias)


@sparse24_linear.register_kernel("cuda")
def _(x, values, meta, bias=None):
    ref.check_inputs(x, values, meta, bias)
    from . import sparse24_dispatch

    return sparse24_dispatch.linear_cuda(x, values, meta, bias)


# ---- autograd: masked dense backward (the 2:4 pattern in meta never changes) ----

def _setup_context(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, values, meta = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    W = torch.ops.prunekit.unpack24(values, meta)
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ W
    flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
    if ctx.needs_input_grad[1]:
        grad_W = flat_grad.t() @ x.reshape(-1, x.shape[-1])  # [out, in]
        nibble = ref_pack.nibbles(meta)  # validated by the forward
        rows, k = grad_W.shape
        groups = grad_W.reshape(rows, k // 4, 4)
        positions = torch.stack((nibble & 3, nibble >> 2), -1)
        grad_values = torch.gather(groups, -1, positions).reshape(rows, k // 2).to(values.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = flat_grad.sum(0)
    return grad_x, grad_values, None, grad_bias


sparse24_linear.register_autograd(_backward, setup_context=_setup_context)
