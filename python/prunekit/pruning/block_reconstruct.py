"""Block-level reconstruction: a few optimizer steps per block on its kept weights, masks fixed.

    pk.prune(model, pk.SparseGPT("2:4"), calib, refine=[pk.LeastSquares(), pk.BlockReconstruct()])

After the pipeline has pruned (and layer-refined) every targeted layer of a block, Adam runs `steps`
steps on the kept weights of those layers, minimizing the mean squared error between the pruned
block's outputs and the dense block's outputs on the calibration inputs (Wanda++'s regional
optimization; the block-wise reconstruction of "free lunch" style retraining-free recovery). The
weights outside each layer's mask get no gradient and are re-zeroed after every step, so the pattern
is exactly the one pruning left (a 2:4 layer stays 2:4).

target:
  * "dense" (default): the dense *model's* output of this block — the dense block run on the dense
    model's hidden states, carried alongside the pruned ones (one extra block forward per block). The
    pruned block, fed the pruned model's hidden states, learns to undo the error of the blocks before
    it as well as its own.
  * "local": the dense block on the same (pruned-model) inputs: only the block's own error.
The next block is always calibrated on the pruned model's outputs, as the references do.

Determinism: the batch order comes from torch's RNG, which prunekit.prune seeds (seed=); Adam runs on
float32 master copies of the weights (any model dtype), written back after each step. The block's
error Σ‖y − y_dense‖² over all calibration batches is measured before and after; when the steps did
not lower it, the block gets its weights back. Cost: `steps` forward+backward passes of one block
on one calibration batch, plus two forward passes over all batches (the before/after error).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from torch import nn

from .. import calibrate

log = logging.getLogger("prunekit")


class BlockReconstruct:
    """Refinement step at block level (see the module docstring).

    steps: Adam steps per block (each on one calibration batch, the batches in a seeded shuffled
        order); lr: Adam's learning rate (its steps are about lr in size, independent of the loss
        scale); bias: also train the pruned layers' biases; target: "dense" or "local".
    """

    def __init__(self, steps: int = 64, lr: float = 5e-4, bias: bool = True, target: str = "dense"):
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"BlockReconstruct steps: expected a non-negative integer, got {steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"BlockReconstruct lr: expected a positive number, got {lr!r}")
        if target not in ("dense", "local"):
            raise ValueError(f"BlockReconstruct target: expected 'dense' or 'local', got {target!r}")
        self.steps, self.lr, self.bias, self.target = steps, float(lr), bool(bias), target

    def __repr__(self) -> str:
        return f"BlockReconstruct(steps={self.steps}, lr={self.lr:g}, target={self.target!r})"

    # ------------------------------------------------------------------------------ the step
    def reconstruct(self, block: nn.Module, index: int, layers: dict[str, nn.Module],
                    masks: dict[str, torch.Tensor], inputs: list, targets: list[torch.Tensor]) -> dict:
        """Trains the kept weights of `layers` (pruned layers of `block`, masks in [out, in] layout) so
        that the block's outputs on `inputs` (calibrate.BlockInput) approach `targets`. Returns the
        record: block error before/after (Σ‖y − y_dense‖² over all batches), seconds, steps."""
        began = time.perf_counter()
        params, pmasks = [], []
        for name, module in layers.items():
            mask = masks[name].to(module.weight.device)
            params.append(module.weight)
            pmasks.append(mask.t() if calibrate.is_conv1d(module) else mask)
            if self.bias and getattr(module, "bias", None) is not None:
                params.append(module.bias)
                pmasks.append(None)
        for p, m in zip(params, pmasks):
            if m is not None and tuple(m.shape) != tuple(p.shape):
                raise RuntimeError(f"BlockReconstruct: mask {tuple(m.shape)} does not fit weight {tuple(p.shape)}")
        saved = [p.detach().clone() for p in params]

        def error() -> float:
            total = 0.0
            for inp, target in zip(inputs, targets):
                total += float((inp.call(block, index).float() - target.float()).pow(2).sum())
            return total

        before = error()
        n = len(inputs)
        order = torch.cat([torch.randperm(n) for _ in range(-(-self.steps // n))]) if n else torch.empty(0)
        flags = [(p, p.requires_grad) for p in block.parameters()]
        master = [p.detach().float().clone() for p in params]
        optimizer = torch.optim.Adam(master, lr=self.lr)
        try:
            for p in block.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                for j in order[:self.steps].tolist():
                    out = inputs[j].call(block, index)
                    target = targets[j]
                    loss = (out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12)
                    grads = torch.autograd.grad(loss, params)
                    with torch.no_grad():
                        for m, g, mk in zip(master, grads, pmasks):
                            m.grad = g.float() if mk is None else g.float() * mk
                        optimizer.step()
                        for p, m, mk in zip(params, master, pmasks):
                            if mk is not None:
                                m.mul_(mk)
                            p.copy_(m)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        after = error()
        reverted = 0
        if not after < before:  # never leave the block worse than pruning left it
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            after, reverted = before, 1
        seconds = time.perf_counter() - began
        log.info("block %d: reconstruction %d steps, block error %.4g -> %.4g%s (%.1f s)", index, self.steps,
                 before, after, " (reverted)" if reverted else "", seconds)
        return {"step": repr(self), "error_before": before, "error_after": after, "seconds": seconds,
                "changed": self.steps, "reverted": reverted}


def split_steps(steps: list) -> tuple[list, BlockReconstruct | None]:
    """(layer steps, the block step or None); the block step must come last and only once."""
    blocks = [s for s in steps if isinstance(s, BlockReconstruct)]
    if not blocks:
        return steps, None
    if len(blocks) > 1:
        raise ValueError(f"refine: at most one BlockReconstruct step, got {len(blocks)}")
    if steps[-1] is not blocks[0]:
        raise ValueError("refine: BlockReconstruct runs after the layer steps of its block; put it last "
                         f"(got {steps!r})")
    return steps[:-1], blocks[0]


class Targets:
    """The dense outputs each block's reconstruction aims at, and the dense model's hidden states
    carried beside the pruned ones (target="dense")."""

    def __init__(self, step: BlockReconstruct, inputs: list):
        self.step = step
        self.stream = [inp.hidden for inp in inputs] if step.target == "dense" else None

    def before_pruning(self, block: nn.Module, index: int, inputs: list) -> list[torch.Tensor]:
        """The block's dense outputs (call before its layers change); advances the dense stream."""
        if self.stream is None:
            return [inp.call(block, index) for inp in inputs]
        out = [replace(inp, hidden=h).call(block, index) for inp, h in zip(inputs, self.stream)]
        self.stream = out
        return out
