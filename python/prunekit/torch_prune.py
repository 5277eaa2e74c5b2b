"""prunekit's criteria as torch.nn.utils.prune methods, and prunekit's masks as torch's reparametrization.

    from torch.nn.utils import prune
    from prunekit import torch_prune as tp

    tp.Magnitude.apply(layer, "weight", sparsity=0.5)                  # the mask of pk.Magnitude(0.5)
    prune.global_unstructured(params, pruning_method=tp.Magnitude, sparsity=0.5)  # pk.Magnitude(0.5, scope="global")
    tp.NM.apply(layer, "weight", n=2, m=4)                             # pk.Magnitude("2:4")
    stats = tp.layer_stats(model, calibration, "wanda")                # statistics of the dense model
    tp.Wanda.apply(layer, "weight", sparsity="2:4", act_norm_sq=stats[name].act_norm_sq)
    tp.SparseGPT.apply(layer, "weight", sparsity=0.5, hessian=stats[name].hessian)
    prune.remove(layer, "weight")                                      # make it permanent, as for torch's own

    tp.apply_masks(model, report)        # after pk.prune(model, ...): its zeros as weight_orig * weight_mask

Each method is a `torch.nn.utils.prune.BasePruningMethod`: `.apply` adds torch's forward pre-hook
reparametrization (`weight_orig`, `weight_mask`), `prune.remove` folds it, `prune.is_pruned` sees it.
The masks are prunekit's (the same selection code as prunekit.prune, ties included), in the weight's own
layout (transformers' Conv1D [in, out] too).

Differences from torch's methods, on purpose:
- `sparsity` is prunekit's: the fraction of the tensor that ends up pruned (0.5, "50%", or "N:M"), per
  row for Wanda/SparseGPT/N:M. Pruning again keeps what was pruned (it counts towards the fraction).
  Only Magnitude over a whole tensor (or with prune.global_unstructured) is an "unstructured" method in
  torch's sense, so there a second application prunes that fraction of the remaining weights, as torch's
  `amount` does.
- SparseGPT changes the kept weights, not only the mask: `apply` writes its reconstruction into
  `weight_orig` where the mask keeps a weight (pruned entries keep their original value, as torch
  keeps them), so `weight` is exactly prunekit's SparseGPT result and `prune.remove` makes it permanent.
- Statistics: `layer_stats` runs the dense model once over the calibration data. prunekit.prune
  instead walks the blocks in order and computes block i's statistics on the output of the already
  pruned blocks before it; on the first block (and a one-block model) both are the same. To get exactly
  prunekit.prune's result as torch reparametrization, prune with prunekit.prune and call `apply_masks`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from . import calibrate, patterns

__all__ = ["Magnitude", "NM", "Wanda", "SparseGPT", "layer_stats", "apply_masks"]


class _Method(torch_prune.BasePruningMethod):
    """Shared: the [out, in] view of the tensor, the default mask kept, the mask in torch's dtype."""

    PRUNING_TYPE = "global"  # the whole tensor with its layout (rows, N:M groups); set per instance

    def __init__(self, sparsity="0.5", *, transposed: bool = False):
        self.pattern = patterns.parse(sparsity)
        self.transposed = transposed

    @classmethod
    def apply(cls, module, name, *args, importance_scores=None, **kwargs):
        kwargs.setdefault("transposed", calibrate.is_conv1d(module) and name == "weight")
        return super().apply(module, name, *args, importance_scores=importance_scores, **kwargs)

    def _keep(self, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_mask(self, t, default_mask):
        if t.dim() == 1:
            return self._keep_flat(t, default_mask)
        if t.dim() != 2:
            raise ValueError(f"{type(self).__name__}: expected a 2-D weight, got shape {tuple(t.shape)}")
        W, D = (t.t(), default_mask.t()) if self.transposed else (t, default_mask)
        kept = D != 0
        keep = self._keep(W.detach().masked_fill(~kept, 0)) & kept
        keep = keep.t() if self.transposed else keep
        return keep.to(default_mask.dtype)

    def _keep_flat(self, t, default_mask):
        raise ValueError(f"{type(self).__name__} ({self.pattern}) needs the weight's 2-D layout; it is not "
                         f"an unstructured method for prune.global_unstructured (use tp.Magnitude with a "
                         f"fraction there)")


class Magnitude(_Method):
    """prunekit.Magnitude's element masks: `score` "l1" |w| or "l2" w²; `scope` "layer" (the lowest
    fraction of the tensor) or "row" (of each output row); an "N:M" sparsity prunes per group of M.
    With prune.global_unstructured it ranks all the given tensors together (pk.Magnitude's scope="global")."""

    def __init__(self, sparsity="0.5", score: str = "l1", scope: str = "layer", *, transposed: bool = False):
        super().__init__(sparsity, transposed=transposed)
        from .pruning.magnitude import Magnitude as _Check

        _Check(sparsity, score=score, scope=scope if scope != "global" else "layer")  # validates the choices
        if scope not in ("layer", "row"):
            raise ValueError(f"Magnitude scope: expected 'layer' or 'row' (global: prune.global_unstructured), "
                             f"got {scope!r}")
        self.score, self.scope = score, scope
        # torch's "unstructured" (required by global_unstructured) for a fraction of the whole tensor
        self.PRUNING_TYPE = "unstructured" if scope == "layer" and not self.pattern.is_nm else "global"

    def _keep(self, W):
        from .pruning.magnitude import magnitude_mask

        return magnitude_mask(W, self.pattern, self.score, scope=self.scope)

    def _keep_flat(self, t, default_mask):
        if self.PRUNING_TYPE != "unstructured":
            return super()._keep_flat(t, default_mask)
        from .pruning.magnitude import magnitude_mask  # noqa: F401  (registers torch.ops.prunekit)
        from .ref.magnitude import element_scores

        # pk.Magnitude(scope="global")'s selection: float32 scores, exactly int(n * sparsity) pruned, ties
        # lowest index first (the tensors in the order global_unstructured concatenates them)
        scores = element_scores(t.detach().reshape(1, -1), self.score).float()
        keep = torch.ops.prunekit.row_keep_mask(scores, self.pattern.sparsity).reshape(t.shape)
        return (keep & (default_mask != 0)).to(default_mask.dtype)

    def __repr__(self) -> str:
        return f"torch_prune.Magnitude({self.pattern}, score={self.score!r}, scope={self.scope!r})"


class NM(Magnitude):
    """N:M magnitude pruning: in every M consecutive inputs of a row keep the N largest (pk.Magnitude("N:M"))."""

    def __init__(self, n: int = 2, m: int = 4, score: str = "l1", *, transposed: bool = False):
        super().__init__(f"{n}:{m}", score, "row", transposed=transposed)


class Wanda(_Method):
    """prunekit.Wanda: score |w| * sqrt(act_norm_sq) (per input feature), lowest fraction per row or N:M.
    act_norm_sq: `layer_stats(..., "wanda")[name].act_norm_sq`."""

    def __init__(self, sparsity="0.5", act_norm_sq: torch.Tensor | None = None, *, transposed: bool = False):
        super().__init__(sparsity, transposed=transposed)
        if not isinstance(act_norm_sq, torch.Tensor):
            raise TypeError("Wanda needs act_norm_sq (the layer's per-input-feature squared input norms, "
                            "torch_prune.layer_stats(model, calibration, 'wanda')[name].act_norm_sq)")
        self.act_norm_sq = act_norm_sq

    def _keep(self, W):
        from .pruning.wanda import wanda_mask

        return wanda_mask(W, self.act_norm_sq.to(W.device), self.pattern)


class SparseGPT(_Method):
    """prunekit's SparseGPT on one layer (hessian: `layer_stats(..., "sparsegpt")[name].hessian`): its mask,
    and its reconstruction of the kept weights written into `<name>_orig` (see the module docstring)."""

    def __init__(self, sparsity="0.5", hessian: torch.Tensor | None = None, blocksize: int = 128,
                 percdamp: float = 0.01, *, transposed: bool = False):
        super().__init__(sparsity, transposed=transposed)
        if not isinstance(hessian, torch.Tensor):
            raise TypeError("SparseGPT needs the layer's Hessian (torch_prune.layer_stats(model, calibration, "
                            "'sparsegpt')[name].hessian)")
        self.hessian, self.blocksize, self.percdamp = hessian, blocksize, percdamp
        self.reconstructed = None

    @classmethod
    def apply(cls, module, name, *args, importance_scores=None, **kwargs):
        if importance_scores is not None:
            raise ValueError("SparseGPT chooses its mask from the weight and the Hessian; importance_scores "
                             "do not apply")
        method = super().apply(module, name, *args, **kwargs)
        last = method[-1] if isinstance(method, torch_prune.PruningContainer) else method
        orig, mask = getattr(module, name + "_orig"), getattr(module, name + "_mask")
        with torch.no_grad():
            orig.copy_(torch.where(mask != 0, last.reconstructed.to(orig.dtype), orig))
            setattr(module, name, last.apply_mask(module))
        last.reconstructed = None
        return method

    def _keep(self, W):
        from .pruning.sparsegpt import sparsegpt_prune

        result = sparsegpt_prune(W, self.hessian.to(W.device), self.pattern, blocksize=self.blocksize,
                                 percdamp=self.percdamp)
        self.reconstructed = result.weight.t() if self.transposed else result.weight
        return result.mask


# ------------------------------------------------------------------------------- statistics
@torch.no_grad()
def layer_stats(model: nn.Module, calibration, kind: str = "wanda", *, include=None, exclude=None,
                batch_size: int = 1) -> dict:
    """{layer name: prunekit.LayerStats} of the chosen linear layers from forwards of `model` as it is
    over `calibration` (token ids [n_samples, seq_len] or batches, as for prunekit.prune). kind: "wanda"
    (act_norm_sq) or "sparsegpt" (hessian). Layers that read the same input share one object."""
    from . import data
    from .collect import collect_stats
    from .pruning.sparsegpt import SparseGPT as _SparseGPT
    from .pruning.wanda import Wanda as _Wanda

    methods = {"wanda": _Wanda, "sparsegpt": _SparseGPT}
    if kind not in methods:
        raise ValueError(f"kind: expected one of {sorted(methods)}, got {kind!r}")
    batches = data.as_batches(calibration, batch_size=batch_size, max_len=data.max_positions(model),
                              vocab=data.vocab_size(model))
    found = calibrate.find_blocks(model)
    layers = calibrate.select_layers(model, include, exclude, found[0] if found is not None else None)
    if not layers:
        raise calibrate.no_layers_error(model, include, exclude)
    device = calibrate.model_device(model)
    extra = calibrate.forward_kwargs(model)

    def run(j: int) -> None:
        model(**calibrate.to_device(batches[j], device), **extra)

    def tokens_of(j: int):
        ids = batches[j].get("input_ids")
        return ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None

    with calibrate.kept_modes(model, train=False), calibrate.calibration_mode(model):
        return collect_stats(layers, run, len(batches), methods[kind](), device, tokens_of)


# ------------------------------------------------------------------------------------ masks
def apply_masks(model: nn.Module, masks) -> list[str]:
    """Puts prunekit's masks on the model as torch.nn.utils.prune reparametrization
    (`prune.custom_from_mask`: `weight_orig`, `weight_mask`, forward pre-hook), layer by layer; returns
    the layer names. masks: a prunekit.Masks, a {layer name: bool [out, in]} dict, or the PruneReport of
    pruning this model (its pruned layers' zeros: `Masks.from_model(model, report=...)`; for another,
    dense copy pass those Masks). Layers already carrying torch's
    reparametrization get the new mask combined with theirs (torch's PruningContainer)."""
    from .report import PruneReport
    from .train.masks import Masks

    if isinstance(masks, PruneReport):
        masks = Masks.from_model(model, report=masks)
    elif not isinstance(masks, Masks):
        if not isinstance(masks, dict):
            raise TypeError(f"masks: expected a prunekit.Masks, a dict of bool masks or a PruneReport, got "
                            f"{type(masks).__name__}")
        masks = Masks(masks)
    layers = masks.check(model)
    for name, module in layers.items():
        keep = masks[name].to(calibrate.layer_weight(module).device)
        torch_prune.custom_from_mask(module, "weight", keep.t() if calibrate.is_conv1d(module) else keep)
    return list(layers)
