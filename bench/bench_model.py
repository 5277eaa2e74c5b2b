"""Whole-model SparseGPT 2:4 on a LLaMA-7B-shaped random model, on one GPU.

Random weights (transformers LlamaConfig with LLaMA-7B sizes, bf16) and random calibration tokens
(128 x 2048 by default) through `prunekit.prune(model, prunekit.SparseGPT("2:4"), tokens, offload=...)`.
Reports total wall time, the time the method itself spent, and the peak GPU memory, with the model
resident on the GPU (offload off) and kept on the CPU with one block at a time on the GPU (offload on).
Target (DESIGN.md §6): <= 30 s on one H100 for 32 blocks; the reference pipeline takes ~755 s.

    python bench/bench_model.py [--blocks 32] [--samples 128] [--seq-len 2048] [--offload both|on|off]

Writes DIR/bench_model.json and DIR/bench_model.md (DIR = --out, default bench/results; row schema in
bench/common.py: M is the number of calibration tokens, mode is resident or offload).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)


def build_model(blocks: int, seq_len: int, device, **overrides):
    """A random LLaMA-7B-shaped model in bf16, built directly on `device` (fast init on the GPU);
    `overrides` replace LlamaConfig sizes (small models for tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA7B, "max_position_embeddings": max(seq_len, 2048), **overrides},
                         num_hidden_layers=blocks)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run_once(run: dict, args, offload: bool) -> dict:
    import prunekit

    gpu = torch.device("cuda")
    model = build_model(args.blocks, args.seq_len, gpu)
    if offload:
        model = model.cpu()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, LLAMA7B["vocab_size"], (args.samples, args.seq_len), generator=g)
    torch.cuda.reset_peak_memory_stats(gpu)
    result = {}

    def prune():
        result["report"] = prunekit.prune(model, prunekit.SparseGPT("2:4"), tokens, offload=offload, device=gpu,
                                          progress=args.progress)

    timing = common.wall_time_ms(prune)  # one run: pruning is in place, the model cannot be pruned twice
    report = result["report"]
    row = common.row(run, "sparsegpt_model", "prunekit", shape=f"llama7b:{args.blocks}blk", dtype=torch.bfloat16,
                     M=args.samples * args.seq_len, mode="offload" if offload else "resident", timing=timing,
                     pattern="2:4", blocks=args.blocks, calib=f"{args.samples}x{args.seq_len}",
                     method_s=report.prune_seconds, peak_gpu_gib=torch.cuda.max_memory_allocated(gpu) / 2**30,
                     layers=len(report.layers), sparsity=report.sparsity, error=report.error)
    del model, report, result
    torch.cuda.empty_cache()
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=32, help="decoder blocks (32 = LLaMA-7B; fewer for quick runs)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--offload", choices=["both", "on", "off"], default="both")
    p.add_argument("--progress", action="store_true", help="show prunekit's progress bar")
    common.add_out_arg(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.require_cuda("bench_model")
    run = common.run_info("bench_model", device, argv, target="<= 30 s for 32 blocks, 128x2048 calib (DESIGN.md §6)")
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.offload]
    rows = []
    for offload in modes:
        rows.append(run_once(run, args, offload))
        print(json.dumps(rows[-1]), flush=True)
        common.write_results(args.out, "bench_model", run, rows)  # keep what is done if a later mode fails
    print(common.results_table.render(run, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
