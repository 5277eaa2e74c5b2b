"""LoRAPrune (Zhang et al., 2023): structured pruning guided by LoRA adapters while they train.

    report = prunekit.loraprune(model, calib_ids, heads=0.5, mlp=0.25, steps=200, iterations=10)

The frozen weights W of every group layer get peft LoRA adapters (ΔW = s·B·A). Taylor importance
needs ∂L/∂W, a full-size gradient of every layer; LoRAPrune estimates it from the adapters'
gradients instead, which backpropagation produces anyway and which are r·(in + out) numbers a layer:

    G ≈ (∂L/∂B)·A + B·(∂L/∂A)        importance I = |(W + s·B·A) ⊙ G|

(the paper's LoRA-guided criterion; its reference code also subtracts the second-order term
(∂L/∂B)·(∂L/∂A), left out here as in the paper's equation). G is formed a few rows at a time and
reduced straight into group scores, so no layer-sized gradient is held; a group's score is the sum
of I over every weight it owns (the dependency groups of prune_structured: KV groups with their
query heads and o_proj columns, MLP channels with their down_proj column). Scores are smoothed
across steps by an exponential moving average Ī ← β·Ī + (1 − β)·I (β = 0.9 as in the reference
code; Ī starts at the first step's I).

Pruning is iterative: the adapters train on the LM loss (or a distillation loss against a teacher;
encoders: the teacher's mean-pooled embedding), and at `iterations` evenly spaced steps the least important still-kept groups are masked (their
q/k/v or up/gate outputs are zeroed by forward hooks, which removes the W and B·A parts together),
the pruned count rising on a cubic schedule (Zhu & Gupta) to the target. At the end the adapters are
merged into W (peft merge_and_unload) and the masked groups are removed physically with
prune_structured's shrinking and config update, so save_pretrained / from_pretrained round-trip.

Unstructured (`sparsity=`): the same I per weight, smoothed per weight, masks the lowest fraction
of each layer. Masked base weights are set to zero as they are pruned; the adapters' delta on them
is dropped when it is merged (`LoRAPruneReport.delta_dropped`: the fraction of ‖s·B·A‖ removed), so
the merged model has exactly the masked pattern.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _validate, calibrate, data
from .._peft import ADAPTER, require_peft
from .._progress import show_progress
from ..train.lora import has_logits, recovery_loss
from . import structured as st
from . import structured_groups as groups
from . import structured_plan as plans
from .structured_importance import select_kept
from .structured_shrink import shrink, update_config

log = logging.getLogger("prunekit")

# --------------------------------------------------------------------------------- criterion
def _adapter(layer: nn.Module, adapter: str = ADAPTER):
    """(W in nn.Linear layout, A [r, in], B [out, r], scaling) of a peft LoRA layer."""
    if not (hasattr(layer, "lora_A") and hasattr(layer, "base_layer")) or adapter not in layer.lora_A:
        raise ValueError(f"{type(layer).__name__} is not a peft LoRA layer with adapter {adapter!r}")
    return (calibrate.layer_weight(layer.get_base_layer()).detach(), layer.lora_A[adapter].weight,
            layer.lora_B[adapter].weight, float(layer.scaling[adapter]))


def _rows_importance(w, a, b, ga, gb, s, rows: slice) -> torch.Tensor:
    """|(W + s·B·A) ⊙ ((∂L/∂B)·A + B·(∂L/∂A))| for a range of output rows, in float32."""
    a, b, ga, gb = a.detach().float(), b[rows].detach().float(), ga.float(), gb[rows].float()
    g = gb @ a + b @ ga
    return ((w[rows].float() + s * (b @ a)) * g).abs_()


def lora_guided_importance(layer: nn.Module, adapter: str = ADAPTER) -> torch.Tensor:
    """Per-weight LoRA-guided importance |(W + s·B·A) ⊙ ((∂L/∂B)·A + B·(∂L/∂A))| of one peft LoRA
    layer, [out_features, in_features] float32, from the adapters' current .grad (an unstructured
    criterion; the structured scores reduce the same quantity without materializing it)."""
    w, a, b, s = _adapter(layer, adapter)
    if a.grad is None or b.grad is None:
        raise ValueError(f"{type(layer).__name__}: the LoRA adapters have no gradient; call loss.backward() first")
    return _rows_importance(w, a, b, a.grad, b.grad, s, slice(None))


def _chunk_rows(out_features: int, in_features: int, unit: int, budget: int = 1 << 16) -> int:
    """Rows per chunk: a multiple of `unit` holding about `budget` elements."""
    return max(unit, (budget // max(in_features, 1)) // unit * unit)


def lora_group_scores(layers: list[nn.Module], kind: groups.GroupKind, adapter: str = ADAPTER) -> torch.Tensor:
    """LoRA-guided importance of each group of one block: the per-weight importance summed over all
    weights the group owns, computed in row chunks (never a whole layer's gradient at once)."""
    total = None
    for layer, s in zip(layers, kind.slices):
        w, a, b, scale = _adapter(layer, adapter)
        if a.grad is None or b.grad is None:
            raise ValueError(f"loraprune: {s.path} has no adapter gradient; call loss.backward() first")
        if total is None:
            total = torch.zeros(kind.count, dtype=torch.float64, device=w.device)
        out_f, in_f = w.shape
        step = _chunk_rows(out_f, in_f, s.size if s.dim == "out" else 1)
        columns = torch.zeros(in_f, dtype=torch.float64, device=w.device) if s.dim == "in" else None
        for r0 in range(0, out_f, step):
            part = _rows_importance(w, a, b, a.grad, b.grad, scale, slice(r0, r0 + step))
            if s.dim == "out":
                g0 = r0 // s.size
                total[g0:g0 + part.shape[0] // s.size] += part.reshape(-1, s.size * in_f).sum(1, dtype=torch.float64)
            else:
                columns += part.sum(0, dtype=torch.float64)
        if columns is not None:
            total += columns.reshape(kind.count, s.size).sum(1)
    return total


# ----------------------------------------------------------------------------------- report
@dataclass
class LoRAPruneReport(st.StructuredReport):
    """StructuredReport plus the training record. Unstructured runs: `sparsity` (of the pruned
    layers) and `delta_dropped` (fraction of the merged adapters' ‖s·B·A‖ that fell on pruned weights)."""

    losses: list[float] | None = None
    steps: int = 0
    iterations: int = 0
    sparsity: float | None = None
    delta_dropped: float | None = None

    def __str__(self) -> str:
        text = super().__str__() if self.sparsity is None else (
            f"unstructured LoRAPrune: sparsity {self.sparsity:.3f} of the adapted layers, "
            f"{self.delta_dropped:.1%} of the adapters' delta norm dropped at merge")
        return f"{text}; {self.steps} steps, {self.iterations} pruning iterations"


# ------------------------------------------------------------------------------------ state
class LoRAPrune:
    """The pieces of LoRAPrune for a custom training loop:

        lp = LoRAPrune(model, heads=0.5, mlp=0.25)       # wraps model's group layers with peft LoRA
        opt = torch.optim.AdamW(lp.parameters(), lr=1e-4)
        for step, batch in enumerate(batches):
            loss = lp.peft_model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            lp.accumulate()                                # LoRA-guided scores into the moving average
            opt.step(); opt.zero_grad()
            if step in prune_steps: lp.prune(progress)     # progress in (0, 1]: fraction of the target
        report = lp.finalize()                             # merge, shrink, update config; model is pruned

    heads / mlp: fractions of KV groups / MLP channels to remove per block (structured, as
    prune_structured); sparsity: fraction of each adapted layer's weights (unstructured). Use one mode.
    """

    def __init__(self, model: nn.Module, *, heads: float = 0.0, mlp: float = 0.0, sparsity: float = 0.0,
                 r: int = 8, lora_alpha: float = 16.0, beta: float = 0.9, round_to: int = 1,
                 blocks: str | None = None):
        peft = require_peft()
        self.heads, self.mlp = plans.ratio(heads, "heads"), plans.ratio(mlp, "mlp")
        self.sparsity = _validate.sparsity(sparsity)
        if self.sparsity and (self.heads or self.mlp):
            raise ValueError("LoRAPrune: give either heads/mlp (structured) or sparsity (unstructured), not both")
        if not (self.sparsity or self.heads or self.mlp):
            raise ValueError("LoRAPrune: nothing to prune; give heads, mlp or sparsity")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"r: expected a positive LoRA rank, got {r!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta: expected a moving-average factor in [0, 1), got {beta!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, peft.PeftModel):
            raise ValueError("LoRAPrune: the model already has peft adapters; give the plain model "
                             "(merge_and_unload() first)")
        self.model, self.beta, self.start = model, beta, time.perf_counter()
        found = calibrate.find_blocks(model, blocks)
        if found is None:
            raise ValueError(f"LoRAPrune: {type(model).__name__} has no list of transformer blocks; name it "
                             f"with blocks=...")
        self.block_path, self.block_list = found
        self.family = groups.detect_family(self.block_list[0])
        self.config = st.text_config(model)
        structured = bool(self.heads or self.mlp)
        heads_on = self.heads > 0 if structured else self.family.attention is not None
        per_block = [groups.group_kinds(self.family, self.config, heads_on, self.mlp > 0 or not structured, block)
                     for block in self.block_list]
        if any(kinds != per_block[0] for kinds in per_block):
            widths = [[k.count for k in kinds] for kinds in per_block]
            raise ValueError(f"LoRAPrune: the blocks' group counts differ ({widths}); LoRAPrune prunes blocks of "
                             f"one shape (use prune_structured for per-block widths)")
        self.kinds = per_block[0]
        self.report = LoRAPruneReport(family=self.family.name, importance="loraprune", blocks=self.block_path)
        self.keeps = {}
        if structured:
            n = len(self.block_list)
            chosen = plans.plan(per_block, self.family, self.config, [self.heads] * n, [self.mlp] * n, round_to)
            self.report.removed, self.report.notes, self.keeps = chosen.removed, chosen.notes, chosen.keeps
            if not self.keeps:
                raise ValueError(f"LoRAPrune: heads={heads}, mlp={mlp} round to no pruning")
        paths = sorted({s.path for kind in self.kinds for s in kind.slices})
        self.params_before = st.n_params(model)
        targets = [f"{self.block_path}.{i}.{p}" for i in range(len(self.block_list)) for p in paths]
        lora = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=targets,
                               fan_in_fan_out=calibrate.is_conv1d(self.block_list[0].get_submodule(paths[0])),
                               bias="none")
        self._flags = {p: p.requires_grad for p in model.parameters()}
        self.peft_model = peft.get_peft_model(model, lora)
        self.step_count, self.n_pruned_steps, self._closed = 0, 0, False
        self._scores: list[dict[str, torch.Tensor]] | None = None
        self._kept: list[dict[str, torch.Tensor]] = [
            {k.name: torch.ones(k.count, dtype=torch.bool) for k in self.kinds if k.name in self.keeps}
            for _ in self.block_list]
        self._hooks = []
        if structured:
            self._attach_group_masks()
        else:
            self.layers = {f"{i}.{p}": block.get_submodule(p) for i, block in enumerate(self.block_list)
                           for p in paths}
            self._weight_keep = {name: None for name in self.layers}
        log.info("LoRAPrune: %s, %d adapted layers, rank %d", self.family.name,
                 len(paths) * len(self.block_list), r)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter parameters."""
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------------- scores
    @torch.no_grad()
    def accumulate(self) -> None:
        """Folds the LoRA-guided importance of the adapters' current gradients into the moving average."""
        self._check_open()
        if self.keeps:
            current = [{k.name: lora_group_scores([block.get_submodule(s.path) for s in k.slices], k)
                        for k in self.kinds if k.name in self.keeps} for block in self.block_list]
        else:
            current = [{name: lora_guided_importance(layer) for name, layer in self.layers.items()}]
        if self._scores is None:
            self._scores = current
        else:
            for avg, new in zip(self._scores, current):
                for key in avg:
                    avg[key].mul_(self.beta).add_(new[key], alpha=1 - self.beta)
        self.step_count += 1

    @property
    def scores(self) -> list[dict[str, torch.Tensor]] | None:
        """The moving-average importance: per block {kind: [count]} (structured), or one dict
        {layer: [out, in]} (unstructured)."""
        return self._scores

    # ------------------------------------------------------------------------------ masks
    @torch.no_grad()
    def prune(self, progress: float) -> None:
        """Masks groups (or weights) so that `progress` ∈ (0, 1] of the target is pruned: of the groups
        still kept, the least important by the moving average; at progress 1 the target exactly."""
        self._check_open()
        if not 0.0 < progress <= 1.0:
            raise ValueError(f"progress: expected a fraction in (0, 1], got {progress!r}")
        if self._scores is None:
            raise RuntimeError("LoRAPrune.prune: no importance yet; call accumulate() after a backward pass")
        if self.keeps:
            for index, per_kind in enumerate(self._kept):
                for kind in self.kinds:
                    if kind.name not in per_kind:
                        continue
                    keep = kind.count - round(progress * (kind.count - self.keeps[kind.name][index]))
                    scores = self._scores[index][kind.name].clone()
                    scores[~per_kind[kind.name].to(scores.device)] = -math.inf
                    mask = torch.zeros(kind.count, dtype=torch.bool)
                    mask[select_kept(scores, keep).cpu()] = True
                    per_kind[kind.name] = mask
        else:
            target = progress * self.sparsity
            for name, layer in self.layers.items():
                scores = self._scores[0][name].clone()
                old = self._weight_keep[name]
                if old is not None:
                    scores[~old] = -math.inf
                n_prune = round(target * scores.numel())
                keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
                keep[torch.sort(scores.flatten(), stable=True).indices[:n_prune]] = False
                keep = keep.reshape(scores.shape)
                self._weight_keep[name] = keep
                calibrate.layer_weight(layer.get_base_layer()).masked_fill_(~keep, 0)
        self.n_pruned_steps += 1
        log.info("LoRAPrune step %d: pruned to %.0f%% of the target", self.step_count, 100 * progress)

    def _attach_group_masks(self) -> None:
        for index, block in enumerate(self.block_list):
            for kind in self.kinds:
                if kind.name not in self.keeps:
                    continue
                for s in kind.slices:
                    if s.dim == "out":
                        layer = block.get_submodule(s.path)
                        self._hooks.append(layer.register_forward_hook(self._mask_hook(index, kind.name, s.size)))

    def _mask_hook(self, index: int, name: str, size: int):
        def hook(module, args, output):
            kept = self._kept[index][name]
            if bool(kept.all()):
                return output
            mask = kept.to(output.device).repeat_interleave(size).to(output.dtype)
            return output * mask
        return hook

    # ---------------------------------------------------------------------------- finalize
    @torch.no_grad()
    def finalize(self) -> LoRAPruneReport:
        """Merges the adapters into the weights and removes the pruned groups (structured) or zeroes
        the pruned weights including the adapters' delta on them (unstructured). The model passed in
        is the pruned, adapter-free model afterwards."""
        self._check_open()
        if self.n_pruned_steps == 0 or (self.keeps and any(
                int(m.sum()) != self.keeps[k][i] for i, per in enumerate(self._kept) for k, m in per.items())):
            raise RuntimeError("LoRAPrune.finalize: the target was not reached; call prune(1.0) first")
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        report = self.report
        report.params, report.steps, report.iterations = (self.params_before, 0), self.step_count, self.n_pruned_steps
        if not self.keeps:
            report.delta_dropped, report.sparsity = self._masked_merge()
        model = self.peft_model.merge_and_unload()
        if model is not self.model:  # pragma: no cover - peft returns the wrapped model itself
            raise RuntimeError("peft merge_and_unload returned a different model object")
        for p, flag in self._flags.items():
            p.requires_grad_(flag)
        if self.keeps:
            for index, block in enumerate(self.block_list):
                kept = {}
                for kind in self.kinds:
                    if kind.name in self.keeps:
                        chosen = self._kept[index][kind.name].nonzero().flatten()
                        shrink(block, kind, chosen)
                        kept[kind.name] = chosen.tolist()
                report.kept.append(kept)
            n = len(self.block_list)
            for name, value in update_config(self.block_list, self.family, self.config, [self.kinds] * n,
                                             self.keeps).items():
                setattr(report, name, value)
        report.params = (report.params[0], st.n_params(self.model))
        report.seconds = time.perf_counter() - self.start
        self._closed = True
        log.info("%s", report)
        return report

    def _masked_merge(self) -> tuple[float, float]:
        """Zeroes the adapters' delta on pruned weights by folding it into W first: W ← (W + s·B·A) ⊙ M,
        then B ← 0, so peft's merge adds nothing. Returns (dropped delta norm fraction, sparsity)."""
        dropped = total = 0.0
        zeros = count = 0
        for name, layer in self.layers.items():
            w, a, b, s = _adapter(layer)
            delta = s * (b.float() @ a.float())
            keep = self._weight_keep[name]
            total += float(delta.square().sum())
            dropped += float(delta[~keep].square().sum())
            merged = ((w.float() + delta) * keep).to(w.dtype)
            calibrate.set_layer_weight(layer.get_base_layer(), merged)
            b.zero_()
            zeros += int((~keep).sum())
            count += keep.numel()
        return (math.sqrt(dropped / total) if total > 0 else 0.0), zeros / count

    def abort(self) -> None:
        """Removes the adapters and mask hooks without pruning anything more (after an error). Weights an
        unstructured run already zeroed stay zero."""
        if self._closed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.peft_model.unload()
        for p, flag in self._flags.items():
            p.requires_grad_(flag)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LoRAPrune.finalize() was called; the adapters are merged")


# ----------------------------------------------------------------------------------- driver
def loraprune(model: nn.Module, batches, *, heads: float = 0.0, mlp: float = 0.0, sparsity: float = 0.0,
              steps: int = 100, iterations: int = 5, lr: float = 1e-4, r: int = 8, lora_alpha: float = 16.0,
              beta: float = 0.9, teacher: nn.Module | None = None, temperature: float = 2.0,
              alpha: float = 1.0, batch_size: int = 1, round_to: int = 1, blocks: str | None = None,
              max_grad_norm: float | None = 1.0, progress: bool | None = None) -> LoRAPruneReport:
    """Prunes `model` in place with LoRAPrune (see the module docstring) and returns the report.

    batches: token ids [n, seq_len] or a list of batches (prunekit.data), cycled for `steps` AdamW
        steps on the adapters.
    iterations: pruning rounds, at steps k·⌊steps/(iterations+1)⌋ for k = 1..iterations (so training
        continues after the last one); round k prunes 1 − (1 − k/iterations)³ of the target.
    teacher: when given (e.g. a copy of the dense model), the loss is distillation_loss with
        `temperature` and `alpha` as in prunekit.recover; otherwise next-token cross-entropy. Encoders
        without an LM head (BERT, MiniLM) need it: their loss is 1 − cos between the mean-pooled
        embeddings, as in recover_lora.
    """
    if not (isinstance(steps, int) and isinstance(iterations, int) and iterations >= 1 and steps > iterations):
        raise ValueError(f"steps/iterations: expected integers with 1 <= iterations < steps, got "
                         f"steps={steps!r}, iterations={iterations!r}")
    items = data.as_batches(batches, batch_size=batch_size, max_len=data.max_positions(model),
                            vocab=data.vocab_size(model))
    causal = has_logits(model)
    if not causal and teacher is None:
        raise ValueError(f"loraprune: {type(model).__name__} has no LM head, so its loss is embedding "
                         "distillation (as in recover_lora) and needs a teacher (e.g. a copy of the dense model)")
    if causal and any("input_ids" not in b for b in items):
        raise ValueError("loraprune: every batch needs input_ids (the next-token positions define the loss)")
    lp = LoRAPrune(model, heads=heads, mlp=mlp, sparsity=sparsity, r=r, lora_alpha=lora_alpha, beta=beta,
                   round_to=round_to, blocks=blocks)
    every = steps // (iterations + 1)
    rounds = {k * every: k for k in range(1, iterations + 1)}
    params = lp.parameters()
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    modes = contextlib.ExitStack()  # every submodule's own training flag comes back, in both models
    modes.enter_context(calibrate.kept_modes(model, train=True))
    if teacher is not None:
        modes.enter_context(calibrate.kept_modes(teacher, train=False))
    try:
        for step in tqdm(range(1, steps + 1), desc="prunekit loraprune", unit="step",
                         disable=not show_progress(progress)):
            loss = recovery_loss(lp.peft_model, items[(step - 1) % len(items)], teacher, temperature=temperature,
                                 alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lp.accumulate()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if step in rounds:
                lp.prune(1 - (1 - rounds[step] / iterations) ** 3)
        optimizer.zero_grad(set_to_none=True)
        report = lp.finalize()
    except BaseException:
        lp.abort()
        raise
    finally:
        modes.close()
    report.losses = losses
    return report
