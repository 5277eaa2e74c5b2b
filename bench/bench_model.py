"""Whole-model SparseGPT 2:4 on a LLaMA-7B-shaped random model, on one GPU.

Random weights (transformers LlamaConfig with LLaMA-7B sizes, bf16) and random calibration tokens
(128 x 2048 by default) through `prunekit.prune(model, prunekit.SparseGPT("2:4"), tokens, offload=...)`.
Reports total wall time, the time the method itself spent, and the peak GPU memory, with the model
resident on the GPU (offload off) and kept on the CPU with one block at a time on the GPU (offload on).
Target (DESIGN.md §6): <= 30 s on one H100 for 32 blocks; the reference pipeline takes ~755 s.

    python bench/bench_model.py [--blocks 32] [--samples 128] [--seq-len 2048] [--offload both|on|off]

Writes DIR/bench_model.json and DIR/bench_model.md (DIR = --out, default bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)


def build_model(blocks: int, seq_len: int, device):
    """A random LLaMA-7B-shaped model in bf16, built directly on `device` (fast init on the GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA7B, "max_position_embeddings": max(seq_len, 2048)}, num_hidden_layers=blocks)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run_once(args, offload: bool) -> dict:
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
    start = time.perf_counter()
    report = prunekit.prune(model, prunekit.SparseGPT("2:4"), tokens, offload=offload, device=gpu,
                            progress=args.progress)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"op": "sparsegpt_model", "pattern": "2:4", "offload": offload, "blocks": args.blocks,
           "samples": args.samples, "seq_len": args.seq_len, "seconds": seconds,
           "method_seconds": report.prune_seconds, "peak_gpu_gib": torch.cuda.max_memory_allocated(gpu) / 2**30,
           "layers": len(report.layers), "sparsity": report.sparsity, "error": report.error,
           "device": torch.cuda.get_device_name(gpu), "torch": torch.__version__}
    del model, report
    torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| blocks | calib | offload | total s | method s | peak GPU GiB | layers | sparsity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['blocks']} | {r['samples']}x{r['seq_len']} | {'on' if r['offload'] else 'off'} | "
                     f"{r['seconds']:.1f} | {r['method_seconds']:.1f} | {r['peak_gpu_gib']:.1f} | {r['layers']} | "
                     f"{r['sparsity']:.3f} |")
    return f"# bench_model — {rows[0]['device']} (torch {rows[0]['torch']})\n\n" + "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=32, help="decoder blocks (32 = LLaMA-7B; fewer for quick runs)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--offload", choices=["both", "on", "off"], default="both")
    p.add_argument("--progress", action="store_true", help="show prunekit's progress bar")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_model.py needs a CUDA GPU, and torch {torch.__version__} sees none "
              f"(torch.version.cuda={torch.version.cuda}). Run it on the GPU machine.", file=sys.stderr)
        return 2
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.offload]
    rows = []
    for offload in modes:
        row = run_once(args, offload)
        print(json.dumps(row), flush=True)
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_model.json"), "w") as f:
        json.dump(rows, f, indent=1)
    table = markdown(rows)
    with open(os.path.join(args.out, "bench_model.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
