"""Per-layer pruning on one GPU, prunekit vs the reference transcriptions, side by side in one run.

SparseGPT: prunekit.sparsegpt_prune vs prunekit.ref.sparsegpt.reference_fasterprune (IST-DASLab's
fasterprune, per-column Python loop). Wanda: prunekit.wanda_mask vs prunekit.ref.wanda (locuslab's
prune_wanda). LLaMA-7B layer shapes, 50% and 2:4. For each: time (CUDA events, median and spread),
speedup, fraction of mask entries that differ, and the relative reconstruction error
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of each provider on the same H. Wanda also gets its bytes floor: read W and
the norms once, write the mask once, at the copy bandwidth measured on this device.

    python bench/bench_prune.py [--shapes 4096x4096,11008x4096] [--patterns 0.5,2:4] [--out DIR]

Writes DIR/bench_prune.json (one row per provider and case, schema in bench/common.py) and
DIR/bench_prune.md; DIR defaults to bench/results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LLAMA7B_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "14336x4096"]  # [out, in]: q/o, up/gate, down, Mistral-style up
PATTERNS = ["0.5", "2:4"]


# ---- problem -----------------------------------------------------------------------------------

def make_layer(out_features: int, in_features: int, device, seed: int = 0):
    """A bf16 weight and calibration statistics from activations with LLM-like per-feature scales
    (log-normal, a few large outliers): H = 2/n XᵀX in fp32, and Wanda's mean squared norms."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(out_features, in_features, generator=g, device=device) * 0.02).bfloat16()
    tokens = max(2 * in_features, 8192)
    scale = torch.exp(torch.randn(in_features, generator=g, device=device) * 0.7)
    X = (torch.randn(tokens, in_features, generator=g, device=device) * scale).bfloat16()
    H = torch.mm(X.t().float(), X.float()) * (2.0 / tokens)
    act_norm_sq = X.float().pow(2).sum(0) / tokens
    return W, H, act_norm_sq


def relative_error(W: torch.Tensor, W_pruned: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the calibration-output error relative to the output energy."""
    Wf = W.float()
    D = Wf - W_pruned.float()
    return float(((D @ H) * D).sum() / ((Wf @ H) * Wf).sum())


def n_m(pattern: str) -> tuple[int, int]:
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return n, m
    return 0, 0


# ---- cases --------------------------------------------------------------------------------------

def shape_of(W: torch.Tensor) -> str:
    return f"{W.shape[0]}x{W.shape[1]}"


def bench_sparsegpt(run: dict, W, H, pattern: str, ref_repeats: int) -> list[dict]:
    import prunekit
    from prunekit.ref.sparsegpt import reference_fasterprune

    n, m = n_m(pattern)
    sparsity = 0.5 if m else float(pattern)
    ours, theirs = {}, {}

    def run_ours():
        ours["res"] = prunekit.sparsegpt_prune(W, H, pattern)

    def run_ref():  # the reference counts PRUNED weights per group (prunen = M - N)
        theirs["res"] = reference_fasterprune(W, H, sparsity, (m - n) if m else 0, m)

    t_ours = common.time_once_ms(run_ours, warmup=2, repeats=5)
    t_ref = common.time_once_ms(run_ref, warmup=0, repeats=ref_repeats)
    W_ref, keep_ref, _ = theirs["res"]
    res = ours["res"]
    err_ours, err_ref = relative_error(W, res.weight, H), relative_error(W, W_ref, H)
    case = dict(shape=shape_of(W), dtype=W.dtype, pattern=pattern,
                mask_diff=float((res.mask != keep_ref).float().mean()))
    return [
        common.row(run, "sparsegpt_layer", "prunekit", timing=t_ours, **case,
                   speedup=t_ref["time_ms"] / t_ours["time_ms"], rel_err=err_ours, rel_err_diff=err_ours - err_ref,
                   sparsity=res.sparsity),
        common.row(run, "sparsegpt_layer", "reference", timing=t_ref, **case, speedup=1.0, rel_err=err_ref,
                   rel_err_diff=0.0, sparsity=1.0 - float(keep_ref.float().mean())),
    ]


def bench_wanda(run: dict, W, H, act_norm_sq, pattern: str, copy_gbs: float) -> list[dict]:
    import prunekit
    from prunekit.ref.wanda import wanda_prune_mask

    n, m = n_m(pattern)
    sparsity = 0.5 if m else float(pattern)
    ours, theirs = {}, {}

    def run_ours():
        ours["keep"] = prunekit.wanda_mask(W, act_norm_sq, pattern)

    def run_ref():  # True = PRUNED there; prune_n counts pruned weights per group
        theirs["pruned"] = wanda_prune_mask(W, act_norm_sq, sparsity, (m - n) if m else 0, m)

    t_ours = common.time_once_ms(run_ours, warmup=3, repeats=20)
    t_ref = common.time_once_ms(run_ref, warmup=1, repeats=5)
    keep_ours, keep_ref = ours["keep"], ~theirs["pruned"]
    err_ours = relative_error(W, W * keep_ours, H)
    err_ref = relative_error(W, W * keep_ref, H)
    nbytes = W.numel() * W.element_size() + act_norm_sq.numel() * 4 + keep_ours.numel()  # bool mask out
    floor_ms = nbytes / (copy_gbs * 1e9) * 1e3
    case = dict(shape=shape_of(W), dtype=W.dtype, bytes_moved=nbytes, pattern=pattern,
                mask_diff=float((keep_ours != keep_ref).float().mean()), bytes=nbytes, bytes_floor_ms=floor_ms)
    return [
        common.row(run, "wanda_mask", "prunekit", timing=t_ours, **case, speedup=t_ref["time_ms"] / t_ours["time_ms"],
                   rel_err=err_ours, rel_err_diff=err_ours - err_ref, x_floor=t_ours["time_ms"] / floor_ms),
        common.row(run, "wanda_mask", "reference", timing=t_ref, **case, speedup=1.0, rel_err=err_ref,
                   rel_err_diff=0.0, x_floor=t_ref["time_ms"] / floor_ms),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(LLAMA7B_SHAPES), help="comma list of OUTxIN")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma list of fractions or N:M")
    p.add_argument("--methods", default="sparsegpt,wanda")
    p.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the (slow) SparseGPT reference")
    common.add_out_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.require_cuda("bench_prune")
    copy_gbs = common.copy_bandwidth_gbs(device)
    run = common.run_info("bench_prune", device, argv, copy_gb_s=round(copy_gbs, 1),
                          sweep_backend=os.environ.get("PRUNEKIT_SWEEP_BACKEND", "auto"),
                          note="reference SparseGPT timed --ref-repeats times (default once)")
    rows: list[dict] = []
    methods = args.methods.split(",")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        W, H, act_norm_sq = make_layer(out_f, in_f, device)
        for pattern in args.patterns.split(","):
            start = time.perf_counter()
            case = []
            if "sparsegpt" in methods:
                case += bench_sparsegpt(run, W, H, pattern, args.ref_repeats)
            if "wanda" in methods:
                case += bench_wanda(run, W, H, act_norm_sq, pattern, copy_gbs)
            for r in case:
                print(json.dumps(r), flush=True)
            rows += case
            common.write_results(args.out, "bench_prune", run, rows)  # keep what is done if a later case fails
            print(f"# {shape} {pattern}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        del W, H, act_norm_sq
        torch.cuda.empty_cache()
    print(common.results_table.render(run, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
