"""Per-layer pruning on one GPU, prunekit vs the reference transcriptions, side by side in one run.

SparseGPT: prunekit.sparsegpt_prune vs prunekit.ref.sparsegpt.reference_fasterprune (IST-DASLab's
fasterprune, per-column Python loop). Wanda: prunekit.wanda_mask vs prunekit.ref.wanda (locuslab's
prune_wanda). LLaMA-7B layer shapes, 50% and 2:4. For each: time (CUDA events, median and spread),
speedup, fraction of mask entries that differ, and the relative reconstruction error
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of each provider on the same H. Wanda also gets its bytes floor: read W and
the norms once, write the mask once, at the copy bandwidth measured on this device.

    python bench/bench_prune.py [--shapes 4096x4096,11008x4096] [--patterns 0.5,2:4] [--out DIR]

Writes DIR/bench_prune.json (one JSON row per provider and case) and DIR/bench_prune.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

LLAMA7B_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "14336x4096"]  # [out, in]: q/o, up/gate, down, Mistral-style up
PATTERNS = ["0.5", "2:4"]


# ---- timing (bench/common.py did not exist when this was written; kept local and small) ----------

def cuda_time_ms(fn, *, warmup: int = 1, repeats: int = 5) -> dict:
    """Median/min/max milliseconds of fn() between CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "repeats": repeats}


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the bytes-floor yardstick."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = cuda_time_ms(lambda: dst.copy_(src), warmup=2, repeats=10)
    return 2 * nbytes / (t["ms"] * 1e-3) / 1e9


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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

def bench_sparsegpt(W, H, pattern: str, ref_repeats: int) -> list[dict]:
    import prunekit
    from prunekit.ref.sparsegpt import reference_fasterprune

    n, m = n_m(pattern)
    sparsity = 0.5 if m else float(pattern)
    ours = {}

    def run_ours():
        ours["res"] = prunekit.sparsegpt_prune(W, H, pattern)

    theirs = {}

    def run_ref():  # the reference counts PRUNED weights per group (prunen = M - N)
        theirs["res"] = reference_fasterprune(W, H, sparsity, (m - n) if m else 0, m)

    t_ours = cuda_time_ms(run_ours, warmup=2, repeats=5)
    t_ref = cuda_time_ms(run_ref, warmup=0, repeats=ref_repeats)
    W_ref, keep_ref, _ = theirs["res"]
    res = ours["res"]
    err_ours, err_ref = relative_error(W, res.weight, H), relative_error(W, W_ref, H)
    common = {"op": "sparsegpt_layer", "pattern": pattern, "mask_diff": float((res.mask != keep_ref).float().mean())}
    return [
        {**common, "provider": "prunekit", **t_ours, "speedup": t_ref["ms"] / t_ours["ms"], "rel_err": err_ours,
         "rel_err_diff": err_ours - err_ref, "sparsity": res.sparsity},
        {**common, "provider": "reference", **t_ref, "speedup": 1.0, "rel_err": err_ref, "rel_err_diff": 0.0,
         "sparsity": 1.0 - float(keep_ref.float().mean())},
    ]


def bench_wanda(W, H, act_norm_sq, pattern: str, copy_gbs: float) -> list[dict]:
    import prunekit
    from prunekit.ref.wanda import wanda_prune_mask

    n, m = n_m(pattern)
    sparsity = 0.5 if m else float(pattern)
    ours, theirs = {}, {}

    def run_ours():
        ours["keep"] = prunekit.wanda_mask(W, act_norm_sq, pattern)

    def run_ref():  # True = PRUNED there; prune_n counts pruned weights per group
        theirs["pruned"] = wanda_prune_mask(W, act_norm_sq, sparsity, (m - n) if m else 0, m)

    t_ours = cuda_time_ms(run_ours, warmup=3, repeats=20)
    t_ref = cuda_time_ms(run_ref, warmup=1, repeats=5)
    keep_ours, keep_ref = ours["keep"], ~theirs["pruned"]
    err_ours = relative_error(W, W * keep_ours, H)
    err_ref = relative_error(W, W * keep_ref, H)
    nbytes = W.numel() * W.element_size() + act_norm_sq.numel() * 4 + keep_ours.numel()  # bool mask out
    floor_ms = nbytes / (copy_gbs * 1e9) * 1e3
    common = {"op": "wanda_mask", "pattern": pattern, "mask_diff": float((keep_ours != keep_ref).float().mean()),
              "bytes": nbytes, "bytes_floor_ms": floor_ms}
    return [
        {**common, "provider": "prunekit", **t_ours, "speedup": t_ref["ms"] / t_ours["ms"], "rel_err": err_ours,
         "rel_err_diff": err_ours - err_ref, "x_floor": t_ours["ms"] / floor_ms,
         "gb_s": nbytes / (t_ours["ms"] * 1e-3) / 1e9},
        {**common, "provider": "reference", **t_ref, "speedup": 1.0, "rel_err": err_ref, "rel_err_diff": 0.0,
         "x_floor": t_ref["ms"] / floor_ms, "gb_s": nbytes / (t_ref["ms"] * 1e-3) / 1e9},
    ]


# ---- output -------------------------------------------------------------------------------------

def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"# bench_prune — {header['device']} (torch {header['torch']}, commit {header['commit']})", "",
             f"Copy bandwidth measured: {header['copy_gb_s']:.0f} GB/s. Times are medians of CUDA-event "
             "timings (reference SparseGPT: a single run).", "",
             "| op | shape (out x in) | pattern | provider | ms (min–max) | speedup | mask diff | rel err | "
             "rel err diff | x bytes floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{r['x_floor']:.1f}" if "x_floor" in r else ""
        lines.append(f"| {r['op']} | {r['shape']} | {r['pattern']} | {r['provider']} | {r['ms']:.3f} "
                     f"({r['ms_min']:.3f}–{r['ms_max']:.3f}) | {r['speedup']:.1f}x | {r['mask_diff']:.2e} | "
                     f"{r['rel_err']:.4e} | {r['rel_err_diff']:+.2e} | {floor} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(LLAMA7B_SHAPES), help="comma list of OUTxIN")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma list of fractions or N:M")
    p.add_argument("--methods", default="sparsegpt,wanda")
    p.add_argument("--ref-repeats", type=int, default=1, help="timed runs of the (slow) SparseGPT reference")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_prune.py needs a CUDA GPU, and torch {torch.__version__} sees none "
              f"(torch.version.cuda={torch.version.cuda}). Run it on the GPU machine.", file=sys.stderr)
        return 2
    import prunekit

    device = torch.device("cuda")
    header = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "commit": git_commit(),
              "copy_gb_s": copy_bandwidth_gbs(device), "backends": prunekit.backends(),
              "sweep_backend": os.environ.get("PRUNEKIT_SWEEP_BACKEND", "auto")}
    rows: list[dict] = []
    methods = args.methods.split(",")
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        W, H, act_norm_sq = make_layer(out_f, in_f, device)
        for pattern in args.patterns.split(","):
            start = time.perf_counter()
            case = []
            if "sparsegpt" in methods:
                case += bench_sparsegpt(W, H, pattern, args.ref_repeats)
            if "wanda" in methods:
                case += bench_wanda(W, H, act_norm_sq, pattern, header["copy_gb_s"])
            for r in case:
                r.update(shape=shape, dtype="bfloat16", device=header["device"], commit=header["commit"])
                print(json.dumps(r), flush=True)
            rows += case
            print(f"# {shape} {pattern}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        del W, H, act_norm_sq
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_prune.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    table = markdown(rows, header)
    with open(os.path.join(args.out, "bench_prune.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
