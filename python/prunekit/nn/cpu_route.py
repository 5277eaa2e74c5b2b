"""The CPU side of the sparse layers (SparseLinear, UnstructuredSparseLinear): before a CPU forward the layer asks
ops/sparse_cpu_route.py (`layer_plan`) how to run. The layer's form follows its decode bucket (M = 1 unless
PRUNEKIT_SPARSE_CPU_DECODE_M or the layer's `serve_m` says otherwise): where the sparse kernel beats dense
F.linear there, the layer holds only its packed weight and runs the kernel, except at an M where dense on a
transient unpacked copy is faster (a long prompt); where dense wins the decode bucket, the layer unpacks itself
for good: the dense weight becomes its only copy (memory <= the nn.Linear it replaced) and the forward is F.linear.
`state_dict()` (and so pk.save) still writes the packed format; `repack()` returns to the packed form.

Not switched: layers whose packed values require grad while grad mode is on (training; under no_grad /
inference_mode, e.g. transformers' generate, they are switched), calls under torch.compile tracing (run one
eager forward per input size first so the choice is made; the compiled op then follows the recorded choice),
non-CPU inputs, and PRUNEKIT_SPARSE_CPU=sparse|dense (forced: the op runs that route on the packed weight).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import sparse_cpu_route as route


class CpuRouted:
    """Mixin for a packed linear layer with `in_features`, `out_features`, `values`, `bias` and the hooks below."""

    FORMAT = ""
    _PACKED = ("values", "meta")
    _RESIZABLE: tuple[str, ...] = ()  # packed tensors whose size depends on the data (not just the shape)
    serve_m: int | None = None  # the M whose winner decides the layer's form (None: PRUNEKIT_SPARSE_CPU_DECODE_M or 1)

    # ---- hooks the layer implements ----
    def _unpacked(self) -> torch.Tensor:  # the dense [out, in] weight from the packed form
        raise NotImplementedError

    def _sparse_call(self, x: torch.Tensor) -> torch.Tensor:  # the C++ kernel on the packed form (checked)
        raise NotImplementedError

    def _kernel_call(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # unchecked (the hot path)
        raise NotImplementedError

    def _pack_dense(self, W: torch.Tensor) -> dict[str, torch.Tensor]:  # {name: tensor} of the packed form
        raise NotImplementedError

    def _empty_packed(self) -> dict[str, torch.Tensor]:  # zero-size placeholders of the packed tensors
        raise NotImplementedError

    def to_dense(self) -> torch.nn.Linear:
        """An nn.Linear holding this layer's (effective, dense) weight and bias."""
        linear = torch.nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                 device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ---- state ----
    @property
    def is_dense(self) -> bool:
        """True once the CPU route turned this layer into a dense layer (the packed form was freed)."""
        return getattr(self, "_dense_weight", None) is not None

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output when the layer is (or now becomes) dense, else None (the caller runs the sparse op).
        Hot path: a plan is measured once per (M bucket, dtype, route context) and then cached on the layer,
        so a call costs a dict lookup and the kernel (the 384-wide layers of an encoder take ~30 us)."""
        dense = self._buffers.get("_dense_weight")
        if dense is not None:
            return F.linear(x, dense, self.bias)
        values = self._parameters.get("values")
        if values is None:
            values = self.values
        if (not x.is_cpu or not values.is_cpu or x.dtype != values.dtype
                or x.shape[-1] != self.in_features or (values.requires_grad and torch.is_grad_enabled())
                or torch.compiler.is_compiling()):
            return None
        ctx = route.context()
        if ctx[0] != "auto":
            return None
        M = x.numel() // self.in_features
        plans = self.__dict__.setdefault("_route_plans", {})
        plan_key = (route.bucket(M) if M else 0, values.dtype, ctx, self.__dict__.get("serve_m"))
        plan = plans.get(plan_key)
        if plan is None:
            plan = self._plan(x)
            if plan != "dense":
                plans[plan_key] = plan
        if plan == "dense":
            self.unpack_()
            return F.linear(x, self._dense_weight, self.bias)
        if plan == "unpack":  # this M: dense math on a transient copy beats the kernel
            return F.linear(x, self._unpacked(), self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return None  # the op, for its autograd formula (it follows its own per-M route)
        return self._kernel_call(x, values)

    def _plan(self, x: torch.Tensor) -> str:
        bias = None if self.bias is None else self.bias.detach()
        form_m = self.__dict__.get("serve_m") or route.decode_m()
        args = (self.FORMAT, self.out_features, self.in_features, self.values.dtype, bias is not None)
        if route.layer_dense(*args, form_m=form_m):
            return "dense"
        values = self.values.detach()  # timed as the hot path runs it (no per-call checks)
        return route.layer_plan(self.FORMAT, x.reshape(-1, self.in_features), self.out_features, bias is not None,
                                lambda probe: self._kernel_call(probe, values), self._unpacked, bias, form_m=form_m,
                                packed=[values, *(getattr(self, name) for name in self._PACKED[1:])])

    def unpack_(self) -> None:
        """Becomes a dense layer: the dense weight replaces the packed form (one copy)."""
        if self.is_dense:
            return
        with torch.inference_mode(False), torch.no_grad():
            W = self._unpacked().contiguous()
        for name, t in self._empty_packed().items():
            self._replace(name, t)
        self._dense_weight = W

    def repack(self) -> None:
        """Back to the packed form (the dense copy is freed)."""
        if not self.is_dense:
            return
        with torch.inference_mode(False), torch.no_grad():
            packed = self._pack_dense(self._dense_weight)
        self._dense_weight = None
        for name, t in packed.items():
            self._replace(name, t)

    def _replace(self, name: str, t: torch.Tensor) -> None:
        old = getattr(self, name)
        if isinstance(old, torch.nn.Parameter):
            setattr(self, name, torch.nn.Parameter(t, requires_grad=old.requires_grad))
        else:
            setattr(self, name, t)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_dense:  # the saved format is always the packed one
            with torch.no_grad():
                for name, t in self._pack_dense(self._dense_weight).items():
                    if name in self._PACKED:
                        destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.is_dense:
            self._dense_weight = None
        for name in self._PACKED:  # take the incoming shapes (a freed or differently sized packed form)
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if (incoming is not None and current is not None and incoming.shape != current.shape
                    and (current.numel() == 0 or name in self._RESIZABLE)):
                self._replace(name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
