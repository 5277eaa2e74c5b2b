"""SparseLinear: an nn.Linear whose weight is stored in the 2:4 format (DESIGN.md §5).

The weight lives as `values` [out, in/2] (a Parameter, frozen unless the source weight required grad:
training it updates only the kept values, so the pattern stays 2:4) and `meta` uint8 [out, in/8] (a
buffer) in the logical format on every device — the CUDA kernel reads that layout directly, so what is
on the device is what is saved.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import _weight_cache
from ..ops import pack24 as pack_ops
from ..ops import sparse24_linear as _linear_op  # noqa: F401  (registers prunekit::sparse24_linear)
from ..ops import sparse_cpu
from ..ref import pack24 as ref_pack
from .cpu_route import CpuRouted


def _weights_changed(module: "SparseLinear", incompatible_keys) -> None:
    """load_state_dict copied into values/meta in place: under inference_mode torch does not count that
    change, so the derived copies cached on CUDA (dense, sm90; ops/_weight_cache.py) are told here."""
    _weight_cache.mark_changed(module.values, module.meta)


class SparseLinear(CpuRouted, nn.Module):
    """A 2:4-sparse nn.Linear (weight packed as values + meta; see the module docstring).

    CPU: the C++ SIMD 2:4 kernel where it beats dense F.linear for the layer's shape and input size, else the
    layer turns itself into a dense layer whose dense weight is its only copy (nn/cpu_route.py); with the
    kernel the layer holds only values + meta (0.53x the dense bytes in fp32, 0.5625x in bf16/fp16).

    CUDA memory: where the dense route is the fastest for some input size (on CUDA where the
    sparse kernels lose, fail their first-call check or do not apply, e.g. large batches on a GPU that is
    not Hopper), the layer keeps a dense copy of its weight next to the packed one (built on first use,
    freed with the layer, rebuilt after an in-place change), so it is never slower than the nn.Linear it
    replaced. That copy costs the dense weight's memory again: set PRUNEKIT_SPARSE24_DENSE_CACHE=0 to unpack
    on every call instead when memory matters more than speed (ops/sparse24_dense.py). CUDA graphs: run
    one forward per input shape before capturing so the copies exist (a capture cannot build them and then
    unpacks inside the graph).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        if in_features % 8 != 0:
            raise ValueError(f"SparseLinear: in_features must be divisible by 8 for the 2:4 format, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.values = nn.Parameter(torch.zeros(out_features, in_features // 2, **kw), requires_grad=False)
        self.register_buffer("meta", torch.full((out_features, in_features // 8), 0x44, dtype=torch.uint8,
                                                device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("_dense_weight", None, persistent=False)  # set only by the CPU route (cpu_route.py)
        self.register_load_state_dict_post_hook(_weights_changed)

    @classmethod
    def from_packed(cls, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                    requires_grad: bool = False) -> "SparseLinear":
        ref_pack.check_packed(values, meta)
        ref_pack.nibble_positions(meta)  # validated once here; the CUDA forward trusts it
        module = cls(2 * values.shape[1], values.shape[0], bias is not None, device=values.device, dtype=values.dtype)
        module.values = nn.Parameter(values, requires_grad=requires_grad)
        module.meta = meta
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
        return module

    @classmethod
    def from_dense(cls, linear: nn.Linear, name: str = "linear") -> "SparseLinear":
        """Packs an exactly-2:4 nn.Linear; raises naming the first group with more than two nonzeros."""
        try:
            values, meta = pack_ops.pack24(linear.weight.detach())
        except ValueError as exc:  # the op names the tensor "W"; name the layer instead
            message = str(exc)
            if message.startswith("W "):
                message = f"{name}.weight" + message[1:]
            raise ValueError(f"cannot convert to SparseLinear: {message}") from None
        except TypeError as exc:
            raise TypeError(f"{name}: cannot convert to SparseLinear: {exc}") from None
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_packed(values, meta, bias, requires_grad=linear.weight.requires_grad)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight (unpacked on every access; for inspection, not for speed)."""
        if self.is_dense:
            return self._dense_weight.detach()
        return torch.ops.prunekit.unpack24(self.values.detach(), self.meta)

    # ---- CPU route hooks (nn/cpu_route.py) ----
    FORMAT = "2:4"

    def _unpacked(self) -> torch.Tensor:
        return torch.ops.prunekit.unpack24(self.values.detach(), self.meta)

    def _sparse_call(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_cpu.s24_linear(x, self.values.detach(), self.meta,
                                     None if self.bias is None else self.bias.detach())

    def _kernel_call(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return sparse_cpu.run_validated(x, values, self._buffers["meta"], None, self._parameters.get("bias"),
                                        self.out_features, self.in_features, sparse_cpu.FORMAT_24)

    def _pack_dense(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        values, meta = torch.ops.prunekit.pack24(W)
        return {"values": values, "meta": meta}

    def _empty_packed(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.new_empty(0, self.in_features // 2),
                "meta": self.meta.new_empty(0, self.in_features // 8)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._cpu_forward(x)
        if y is not None:
            return y
        return torch.ops.prunekit.sparse24_linear(x, self.values, self.meta, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={'dense (CPU route)' if self.is_dense else '2:4'}")
