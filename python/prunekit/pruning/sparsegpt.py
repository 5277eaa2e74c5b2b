"""SparseGPT (Frantar & Alistarh 2023): prune a layer column block by column block, updating the
not-yet-pruned weights to compensate (optimal brain surgeon with the layer's Hessian H = 2/n XᵀX).

Same algorithm and masks as IST-DASLab/sparsegpt `fasterprune` (prunekit.ref.sparsegpt is the
transcription we test against), with these changes:
  * the inverse-Hessian factor comes from one reversed Cholesky and one triangular inverse instead of
    cholesky -> cholesky_inverse -> cholesky (DESIGN.md §4, saving 1);
  * each block's sweep is one op call (`prunekit::obs_sweep`: C++, CUDA or Triton) instead of ~10
    launches per column, and the trailing update is one GEMM per block;
  * a Hessian that is not positive definite does not crash: damping escalates and Cholesky retries in
    float64, and the result's notes say what happened;
  * unstructured blocks prune exactly int(numel * sparsity) weights (the reference prunes one more).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from .. import _validate, patterns
from ..ops import obs_sweep as _obs_sweep_op  # noqa: F401  (registers torch.ops.prunekit.obs_sweep)
from ..ops import select_mask as _select_mask_ops  # noqa: F401  (registers prunekit::tensor_keep_mask)
from .base import LayerResult, PruningMethod
from .damping import MAX_PERCDAMP, damping_ladder
from .stats import LayerStats

log = logging.getLogger("prunekit")

# Relative damping is escalated x10 per attempt up to this multiple of mean(diag(H)); beyond it the
# update would be little more than magnitude pruning, and an H that still fails is broken, not singular.


def hinv_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = UᵀU), from a positive definite H, without forming H^-1.

    With J the index reversal, J·H·J = L·Lᵀ gives H = (J·L·J)(J·L·J)ᵀ where J·L·J is upper triangular,
    so H^-1 = ((J·L·J)^-1)ᵀ (J·L·J)^-1 and U = (J·L·J)^-1 = J·L^-1·J: one Cholesky, one triangular
    inverse. (Hᵀ is flipped so that, like the reference's Cholesky, only H's lower triangle is read.)
    """
    L, info = torch.linalg.cholesky_ex(H.mT.flip((0, 1)))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"H is not positive definite (Cholesky failed at pivot {int(info)})")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip((0, 1))


def _try_factor(H: torch.Tensor, percdamp: float, dtype: torch.dtype):
    """U for H + percdamp·mean(diag(H))·I computed in `dtype` (returned as float32), or None when that
    matrix is not numerically positive definite. Returns (U or None, the absolute damping)."""
    Hd = H.to(dtype, copy=True)
    damp = percdamp * torch.mean(torch.diagonal(Hd))  # as the reference computes it
    Hd.diagonal().add_(damp)
    try:
        U = hinv_factor(Hd)
    except torch.linalg.LinAlgError:
        return None, float(damp)
    # Every Cholesky pivot of H + damp·I is >= damp when H is PSD (1/diag(U)^2 are those pivots): one
    # far below means round-off, not H, decided the factor. With no damping at all, a pivot near the
    # precision's resolution flags a singular H.
    pivots = U.diagonal().reciprocal().square()
    resolution = (1e-6 if dtype == torch.float32 else 1e-12) * torch.mean(torch.diagonal(Hd))
    floor = torch.maximum(0.1 * damp, resolution)
    # diag(U) positive and finite too: the GPU sweeps would otherwise give NaN or wrong masks silently.
    if (not bool(torch.isfinite(U).all()) or not bool((U.diagonal() > 0).all())
            or not bool((pivots >= floor).all())):
        return None, float(damp)
    return U.float(), float(damp)


def damped_hinv_factor(H: torch.Tensor, percdamp: float, name: str = "layer"):
    """U for H + λI with λ = percdamp · mean(diag(H)), escalating when H + λI is not numerically PD.

    Tries float32 at `percdamp` (the reference's choice), then float64, then float64 with damping x10
    per step up to MAX_PERCDAMP. Returns (U float32, percdamp used, notes).
    """
    attempts = damping_ladder(percdamp)
    for used, dtype in attempts:
        U, damp = _try_factor(H, used, dtype)
        if U is None:
            continue
        notes = []
        if (used, dtype) != attempts[0]:
            notes.append(f"{name}: the float32 Cholesky of H + {percdamp:g}·mean(diag(H))·I failed (H is "
                         "singular, indefinite or too ill-conditioned); "
                         f"used damping {used:g}·mean(diag(H)) = {damp:.4g} with a "
                         f"{str(dtype).removeprefix('torch.')} Cholesky")
            log.debug(notes[-1])  # the caller reports notes (prunekit.prune logs them)
        return U, used, notes
    raise RuntimeError(f"{name}: the Hessian is not positive definite even with damping "
                       f"{MAX_PERCDAMP:g}·mean(diag(H)) in float64; it is probably corrupt "
                       "(check the calibration inputs)")


def _pattern(sparsity, n: int, m: int) -> patterns.Pattern:
    if n or m:
        return patterns.parse((n, m))
    return patterns.parse(sparsity)


def _validate_inputs(W: torch.Tensor, H: torch.Tensor, pattern: patterns.Pattern, name: str) -> None:
    _validate.float_tensor(W, f"{name}.weight", ndim=2)
    _validate.finite(W, f"{name}.weight")
    _validate.float_tensor(H, f"{name} Hessian", ndim=2)
    _validate.shape(H, (W.shape[1], W.shape[1]), f"{name} Hessian")
    _validate.same_device(f"{name}.weight", W, f"{name} Hessian", H)
    _validate.finite(H, f"{name} Hessian")
    pattern.check_width(W.shape[1], f"{name}.weight")


def _block_size(blocksize: int, pattern: patterns.Pattern) -> int:
    """N:M groups must not straddle blocks: the reference restarts its every-M-columns selection at each
    block, so a block width that is not a multiple of M silently shifts the groups. Use the largest
    multiple of M that fits (the default 128 already is one for M = 2, 4, 8, 16)."""
    if blocksize < 1:
        raise ValueError(f"blocksize: expected a positive integer, got {blocksize}")
    if not pattern.is_nm:
        return blocksize
    return max(pattern.m, blocksize // pattern.m * pattern.m)


def block_keep_mask(W1: torch.Tensor, Hinv1: torch.Tensor, pattern: patterns.Pattern) -> torch.Tensor:
    """A block's unstructured kept-mask, chosen up front from the OBS scores w² / [H^-1]_ii²; all False
    for N:M, whose groups are chosen during the sweep from the updated weights."""
    if pattern.is_nm:
        return torch.zeros_like(W1, dtype=torch.bool)
    return torch.ops.prunekit.tensor_keep_mask(W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2, pattern.sparsity)


@dataclass
class HessianFactor:
    """What SparseGPT derives from H alone, shared by layers that read the same input (q/k/v share one,
    gate/up share one: 4 factorizations per Llama block instead of 7, DESIGN.md §4 saving 2)."""

    U: torch.Tensor      # upper Cholesky factor of (H + λI)^-1, float32
    dead: torch.Tensor   # bool [in]: inputs that never fired (H_ii = 0); their weights are zeroed
    percdamp: float      # the relative damping that made H + λI positive definite
    notes: list[str]     # what the factorization had to do (escalated damping, float64)


def factor_hessian(H: torch.Tensor, percdamp: float = 0.01, name: str = "layer") -> HessianFactor:
    """Dead inputs get H_ii = 1 (as the reference), then the damped, escalating factorization."""
    if not percdamp >= 0:
        raise ValueError(f"percdamp: expected a non-negative number, got {percdamp}")
    _validate.finite(H, f"{name} Hessian")
    Hf = H.detach().to(torch.float32, copy=True)
    dead = torch.diagonal(Hf) == 0
    Hf.diagonal()[dead] = 1
    U, used_damp, notes = damped_hinv_factor(Hf, percdamp, name)
    return HessianFactor(U=U, dead=dead, percdamp=used_damp, notes=notes)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity="0.5", n: int = 0, m: int = 0, *,
                    blocksize: int = 128, percdamp: float = 0.01, name: str = "layer",
                    factor: HessianFactor | None = None) -> LayerResult:
    """Prune W [out, in] (nn.Linear layout) with SparseGPT given H [in, in] = 2/n XᵀX.

    `sparsity` is a fraction or a pattern ("50%", "2:4"); n and m, when given, define an N:M pattern
    (n kept of every m inputs). `factor` (from `factor_hessian(H, percdamp)`) skips the factorization
    when several layers share H. Returns a LayerResult: the pruned weight in W's dtype, the kept-mask,
    the relative damping used (percdamp, or more when H needed it), the OBS loss estimate and notes.
    """
    pattern = _pattern(sparsity, n, m)
    _validate_inputs(W, H, pattern, name)
    block = _block_size(blocksize, pattern)
    if factor is None:
        factor = factor_hessian(H, percdamp, name)
    U = factor.U
    Wf = W.detach().to(torch.float32, copy=True)
    notes = list(factor.notes)
    n_dead = int(factor.dead.sum())
    if n_dead:
        Wf[:, factor.dead] = 0
        notes.append(f"{name}: {n_dead} dead input feature(s) (H_ii = 0); their weights were set to 0")
    rows, cols = Wf.shape

    keep = torch.empty_like(Wf, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float32, device=Wf.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wf[:, i1:i2].contiguous()
        Hinv1 = U[i1:i2, i1:i2].contiguous()
        keep1 = block_keep_mask(W1, Hinv1, pattern)
        Q1, Err1, loss1, keep1 = torch.ops.prunekit.obs_sweep(W1, Hinv1, keep1, pattern.n, pattern.m)
        Wf[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        losses += loss1
        if i2 < cols:
            Wf[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return LayerResult(weight=Wf.to(W.dtype), mask=keep, pattern=pattern, damping=factor.percdamp,
                       loss_estimate=float(losses.sum()), notes=notes)


class SparseGPT(PruningMethod):
    """SparseGPT as a pipeline method: needs each layer's Hessian, prunes with `sparsegpt_prune`, or,
    given `quant` (a prunekit.QuantSpec), prunes and quantizes jointly with `sparsegpt_quant_prune`."""

    name = "sparsegpt"
    needs_hessian = True

    def __init__(self, sparsity="0.5", blocksize: int = 128, percdamp: float = 0.01, quant=None):
        super().__init__(sparsity)
        self.blocksize = blocksize
        self.percdamp = percdamp
        if quant is not None:
            from ..quant.quantizer import QuantSpec
            if not isinstance(quant, QuantSpec):
                raise TypeError(f"SparseGPT quant: expected a prunekit.QuantSpec or None, got {quant!r}")
        self.quant = quant

    def check_weight(self, weight: torch.Tensor, name: str) -> None:
        super().check_weight(weight, name)
        if self.quant is not None:
            self.quant.group_width(weight.shape[1], f"{name}.weight")

    def prune_layer(self, weight: torch.Tensor, stats: LayerStats | None, name: str = "layer") -> LayerResult:
        if stats is None or stats.hessian is None:
            raise ValueError(f"{name}: SparseGPT needs the layer's Hessian; collect LayerStats with "
                             "hessian=True (method.new_stats does)")
        self.check_weight(weight, name)
        if stats.nsamples == 0:
            raise ValueError(f"{name}: SparseGPT statistics saw no calibration samples (every input would "
                             "look dead and the whole weight would be zeroed)")
        stats.check_finite()
        H = stats.hessian if stats.hessian.device == weight.device else stats.hessian.to(weight.device)
        key = ("sparsegpt.factor", self.percdamp, H.device)
        if key in stats.derived:  # shared H (q/k/v, gate/up): the layer that factored it carries its notes
            factor = dataclasses.replace(stats.derived[key], notes=[])
        else:
            factor = stats.derived[key] = factor_hessian(H, self.percdamp, name)
        if self.quant is not None:
            from ..quant.sparse_quant import sparsegpt_quant_prune
            return sparsegpt_quant_prune(weight, H, self.pattern, bits=self.quant.bits,
                                         groupsize=self.quant.groupsize, sym=self.quant.sym,
                                         blocksize=self.blocksize, percdamp=self.percdamp, name=name,
                                         factor=factor)
        return sparsegpt_prune(weight, H, self.pattern, blocksize=self.blocksize,
                               percdamp=self.percdamp, name=name, factor=factor)

    def __repr__(self) -> str:
        quant = "" if self.quant is None else f", quant={self.quant}"
        return f"SparseGPT({self.pattern}, blocksize={self.blocksize}, percdamp={self.percdamp:g}{quant})"
