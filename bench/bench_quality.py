"""Quality of pruned models with and without refinement steps, on the real all-MiniLM-L6-v2 (CPU).

The demo's setup (prunekit/demo.py): calibrate on one half of the shipped English corpus, evaluate on the
other. For each method x pattern x refinement recipe it prunes a fresh copy of the dense model and
records
  * layer error: the pipeline's summed reconstruction error Σ_layers Σ_tokens ||(W − Ŵ)x||² (report.error);
  * the model's fidelity on held-out sentences: mean cosine of pruned vs dense embeddings, and how often
    a sentence's nearest neighbour stays the same;
  * wall seconds for the whole prune call and the refinement steps' share of it, and the process CPU
    seconds of the prune call (the comparable number on a shared machine).

    python bench/bench_quality.py [--methods wanda,sparsegpt] [--patterns 0.5,2:4,0.7]
                                  [--recipes none,dsnot,ls,dsnot+ls] [--threads N] [--out DIR]

Writes DIR/bench_quality.json and DIR/bench_quality.md (DIR defaults to bench/results).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import prunekit as pk
from prunekit import data, demo
from prunekit import eval as pk_eval
from prunekit.pipeline import make_method

RECIPES = {
    "none": lambda: None,
    "dsnot": lambda: [pk.DSnoT()],
    "ls": lambda: [pk.LeastSquares()],
    "dsnot+ls": lambda: [pk.DSnoT(), pk.LeastSquares()],
}


def run(methods, patterns, recipes, *, n_samples=64, seq_len=64, seed=0, log=print, save=None):
    dense, tokenizer = demo.load_minilm()
    calib_text, eval_text = demo.split_sentences()
    calibration = data.calibration_batches(tokenizer, calib_text, n_samples, seq_len, seed, special_tokens=True)
    held_out = data.encode_sentences(tokenizer, eval_text, batch_size=64)
    reference = pk_eval.embed(dense, held_out)
    rows = []
    for pattern in patterns:
        for method in methods:
            for recipe in recipes:
                model = copy.deepcopy(dense)
                began, cpu = time.perf_counter(), time.process_time()
                report = pk.prune(model, make_method(method, pattern), calibration, seed=seed, progress=False,
                                  batch_size=16, refine=RECIPES[recipe]())
                seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
                fidelity = pk_eval.compare_embeddings(reference, pk_eval.embed(model, held_out))
                refine_s = sum(r["seconds"] for layer in report.layers for r in layer.refine)
                rows.append({"method": method, "pattern": pattern, "recipe": recipe, "layer_error": report.error,
                             "cosine": fidelity["cosine"], "nn_agreement": fidelity["nn_agreement"],
                             "sparsity": report.sparsity, "seconds": seconds, "cpu_seconds": cpu,
                             "refine_seconds": refine_s})
                log(table(rows[-1:], header=not rows[:-1]), flush=True)
                if save is not None:
                    save(rows)
    return rows


def table(rows, header=True) -> str:
    lines = []
    if header:
        lines = ["| method | pattern | refine | layer error | vs none | cosine | nn-agree | wall s | refine wall s | CPU s |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['recipe']} | {r['layer_error']:.4g} | "
                     f"{r.get('vs_none', '')} | {r['cosine']:.4f} | {r['nn_agreement']:.3f} | "
                     f"{r['seconds']:.1f} | {r['refine_seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    return "\n".join(lines)


def with_ratios(rows):
    base = {(r["method"], r["pattern"]): r["layer_error"] for r in rows if r["recipe"] == "none"}
    for r in rows:
        b = base.get((r["method"], r["pattern"]))
        r["vs_none"] = f"{r['layer_error'] / b:.3f}" if b else ""
    return rows


def run_info(threads) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": threads, "torch": torch.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--patterns", default="0.5,2:4,0.7")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = args.recipes.split(",")
    for r in recipes:
        if r not in RECIPES:
            ap.error(f"--recipes: {r!r} is not one of {sorted(RECIPES)}")
    info = run_info(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows):  # after every case, so an interrupted run keeps what it finished
        rows = with_ratios(rows)
        (out / "bench_quality.json").write_text(json.dumps({"run": info, "rows": rows}, indent=2))
        md = (f"all-MiniLM-L6-v2, {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
              f"commit {info['commit']}, {info['date']}\n\n{table(rows)}\n")
        (out / "bench_quality.md").write_text(md)
        return md

    rows = run(args.methods.split(","), args.patterns.split(","), recipes, save=save)
    print("\n" + save(rows))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
