"""UnstructuredSparseLinear: an nn.Linear whose weight is stored in the bitmask format (ref/bitmask.py) for
unstructured high sparsity (70-90%), where 2:4 does not apply. Bytes per weight (bf16, 80% sparse): 0.525 of
dense. CPU forward: the C++ SIMD kernel where it beats dense F.linear, else the layer turns dense (one copy;
nn/cpu_route.py). Inference only: the packed values are frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import bitmask_linear as _op  # noqa: F401  (registers prunekit::bitmask_linear)
from ..ops import sparse_cpu
from ..ref import bitmask as ref
from .cpu_route import CpuRouted


class UnstructuredSparseLinear(CpuRouted, nn.Module):
    """values [nnz + 16] (kept weights row after row, then padding), mask uint8 [out, in/8], row_offsets int64
    [out + 1] (derived from the mask; not saved)."""

    FORMAT = "bitmask"
    _PACKED = ("values", "mask")
    _RESIZABLE = ("values",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        if in_features % 8 != 0:
            raise ValueError(f"UnstructuredSparseLinear: in_features must be divisible by 8, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.values = nn.Parameter(torch.zeros(ref.PADDING, **kw), requires_grad=False)
        self.register_buffer("mask", torch.zeros(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.register_buffer("row_offsets", torch.zeros(out_features + 1, dtype=torch.int64, device=device),
                             persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        self.register_buffer("_dense_weight", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_offsets())

    @classmethod
    def from_dense(cls, linear: nn.Linear, name: str = "linear") -> "UnstructuredSparseLinear":
        W = linear.weight.detach()
        try:
            values, mask = ref.pack(W, name=f"{name}.weight")
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"cannot convert to UnstructuredSparseLinear: {exc}") from None
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=W.device, dtype=W.dtype)
        module.values = nn.Parameter(values, requires_grad=False)
        module.mask = mask
        module._refresh_offsets()
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def _refresh_offsets(self) -> None:
        if self.mask.numel() == 0:
            return
        offsets = ref.row_offsets(self.mask)
        if self.values.numel() != int(offsets[-1]) + ref.PADDING:
            raise ValueError(f"values: {self.values.numel()} elements but the mask keeps {int(offsets[-1])} "
                             f"(expected {int(offsets[-1])} + {ref.PADDING} padding)")
        self.row_offsets = offsets

    @property
    def weight(self) -> torch.Tensor:
        return self._dense_weight.detach() if self.is_dense else self._unpacked()

    @property
    def density(self) -> float:
        return float(self.row_offsets[-1]) / max(1, self.in_features * self.out_features)

    # ---- CPU route hooks (nn/cpu_route.py) ----
    def _unpacked(self) -> torch.Tensor:
        return torch.ops.prunekit.bitmask_unpack(self.values.detach(), self.mask)

    def _sparse_call(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_cpu.bitmask_linear(x, self.values.detach(), self.mask, self.row_offsets,
                                         None if self.bias is None else self.bias.detach())

    def _kernel_call(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return sparse_cpu.run_validated(x, values, self._buffers["mask"], self._buffers["row_offsets"],
                                        self._parameters.get("bias"), self.out_features, self.in_features,
                                        sparse_cpu.FORMAT_BITMASK)

    def _pack_dense(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        values, mask = ref.pack(W)
        return {"values": values, "mask": mask, "row_offsets": ref.row_offsets(mask)}

    def _empty_packed(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.new_empty(0), "mask": self.mask.new_empty(0, self.in_features // 8),
                "row_offsets": self.row_offsets.new_empty(0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._cpu_forward(x)
        if y is not None:
            return y
        return torch.ops.prunekit.bitmask_linear(x, self.values, self.mask, self.row_offsets, self.bias)

    def extra_repr(self) -> str:
        fmt = "dense (CPU route)" if self.is_dense else f"bitmask, density={self.density:.3f}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, format={fmt}"
