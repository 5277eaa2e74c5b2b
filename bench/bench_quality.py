"""Quality of pruned models with and without refinement steps (CPU): the real all-MiniLM-L6-v2, and a
small causal LM trained here on real English text (bench/tiny_lm.py).

MiniLM ("minilm"): the demo's setup (prunekit/demo.py): calibrate on one half of the shipped English
corpus, evaluate on the other. Causal LM ("lm"): calibrate on 64 windows of 128 tokens of its train
text, evaluate perplexity on the first 64 windows of 128 tokens of its held-out text (documents it never
saw). For each model x method x pattern x refinement recipe it prunes a fresh copy of the dense model and
records
  * layer error: the pipeline's summed reconstruction error Σ_layers Σ_tokens ||(W − Ŵ)x||² (report.error;
    after BlockReconstruct this is the error of its weights, which it does not minimize);
  * MiniLM: the fidelity on held-out sentences: mean cosine of pruned vs dense embeddings, and how often
    a sentence's nearest neighbour stays the same; LM: held-out perplexity;
  * wall seconds for the whole prune call and the refinement steps' share of it, and the process CPU
    seconds of the prune call (the comparable number on a shared machine), also as a multiple of plain
    SparseGPT's at the same pattern ("x sgpt").

    python bench/bench_quality.py [--models minilm,lm] [--methods wanda,sparsegpt] [--patterns 0.5,2:4,0.7]
                                  [--recipes none,dsnot,ls,br,all] [--threads N] [--out DIR]

Writes DIR/bench_quality.json, DIR/bench_quality.md and DIR/bench_quality.png (DIR defaults to
bench/results). All prune calls use batch_size 4 (BlockReconstruct takes one Adam step per batch).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import prunekit as pk  # noqa: E402
from prunekit import data, demo  # noqa: E402
from prunekit import eval as pk_eval  # noqa: E402
from prunekit.pipeline import make_method  # noqa: E402

RECIPES = {
    "none": lambda: None,
    "dsnot": lambda: [pk.DSnoT()],
    "ls": lambda: [pk.LeastSquares()],
    "dsnot+ls": lambda: [pk.DSnoT(), pk.LeastSquares()],
    "br": lambda: [pk.BlockReconstruct()],
    "dsnot+br": lambda: [pk.DSnoT(), pk.BlockReconstruct()],
    "ls+br": lambda: [pk.LeastSquares(), pk.BlockReconstruct()],
    "br-local": lambda: [pk.BlockReconstruct(target="local")],
    "all": lambda: [pk.DSnoT(), pk.LeastSquares(), pk.BlockReconstruct()],
}
BATCH = 4


class MiniLM:
    name = "minilm"

    def __init__(self, seed=0, n_samples=64, seq_len=64):
        self.dense, tokenizer = demo.load_minilm()
        calib_text, eval_text = demo.split_sentences()
        self.calibration = data.calibration_batches(tokenizer, calib_text, n_samples, seq_len, seed,
                                                    special_tokens=True)
        self.held_out = data.encode_sentences(tokenizer, eval_text, batch_size=64)
        self.reference = pk_eval.embed(self.dense, self.held_out)

    def measure(self, model) -> dict:
        return pk_eval.compare_embeddings(self.reference, pk_eval.embed(model, self.held_out))


class TinyLM:
    name = "lm"

    def __init__(self, seed=0, n_samples=64, seq_len=128, eval_windows=64):
        import tiny_lm

        self.dense, train_ids, test_ids = tiny_lm.load()
        self.seq_len = seq_len
        self.calibration = data.windows(train_ids, n_samples, seq_len, seed)
        self.test = test_ids[:eval_windows * seq_len]

    def measure(self, model) -> dict:
        return {"ppl": pk_eval.perplexity(model, self.test, seq_len=self.seq_len, batch_size=8)}


def run(models, methods, patterns, recipes, *, seed=0, log=print, save=None):
    rows = []
    for kind in models:
        bench = {"minilm": MiniLM, "lm": TinyLM}[kind](seed)
        dense_row = {"model": kind, "method": "dense", "pattern": "-", "recipe": "-", **bench.measure(bench.dense)}
        rows.append(dense_row)
        log(table(rows[-1:], header=len(rows) == 1), flush=True)
        for pattern in patterns:
            for method in methods:
                for recipe in recipes:
                    model = copy.deepcopy(bench.dense)
                    began, cpu = time.perf_counter(), time.process_time()
                    report = pk.prune(model, make_method(method, pattern), bench.calibration, seed=seed,
                                      progress=False, batch_size=BATCH, refine=RECIPES[recipe]())
                    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
                    refine_s = sum(r["seconds"] for layer in report.layers for r in layer.refine)
                    rows.append({"model": kind, "method": method, "pattern": pattern, "recipe": recipe,
                                 "layer_error": report.error, **bench.measure(model), "sparsity": report.sparsity,
                                 "seconds": seconds, "cpu_seconds": cpu, "refine_seconds": refine_s})
                    with_ratios(rows)
                    log(table(rows[-1:], header=False), flush=True)
                    if save is not None:
                        save(rows)
    return rows


def _fmt(r, key, spec):
    return format(r[key], spec) if r.get(key) is not None else ""


def table(rows, header=True) -> str:
    lines = []
    if header:
        lines = ["| model | method | pattern | refine | layer error | vs none | cosine | nn-agree | ppl | wall s "
                 "| refine wall s | CPU s | x sgpt |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['pattern']} | {r['recipe']} | {_fmt(r, 'layer_error', '.4g')} | "
                     f"{r.get('vs_none', '')} | {_fmt(r, 'cosine', '.4f')} | {_fmt(r, 'nn_agreement', '.3f')} | "
                     f"{_fmt(r, 'ppl', '.2f')} | {_fmt(r, 'seconds', '.1f')} | {_fmt(r, 'refine_seconds', '.1f')} | "
                     f"{_fmt(r, 'cpu_seconds', '.1f')} | {r.get('x_sgpt', '')} |")
    return "\n".join(lines)


def with_ratios(rows):
    """vs none: layer error over the same method's unrefined row; x sgpt: CPU seconds over plain SparseGPT's."""
    base = {(r["model"], r["method"], r["pattern"]): r["layer_error"] for r in rows if r["recipe"] == "none"}
    sgpt = {(r["model"], r["pattern"]): r["cpu_seconds"] for r in rows
            if r["recipe"] == "none" and r["method"] == "sparsegpt"}
    for r in rows:
        if r["method"] == "dense":
            continue
        b = base.get((r["model"], r["method"], r["pattern"]))
        r["vs_none"] = f"{r['layer_error'] / b:.3f}" if b else ""
        t = sgpt.get((r["model"], r["pattern"]))
        r["x_sgpt"] = f"{r['cpu_seconds'] / t:.1f}" if t else ""
    return rows


def plot(rows, path) -> None:
    """One panel per model: the quality metric per pattern, one bar per method + recipe, dense as a line."""
    from matplotlib.figure import Figure

    models = [m for m in ("minilm", "lm") if any(r["model"] == m for r in rows)]
    fig = Figure(figsize=(12, 4.5 * len(models)))
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    for ax, kind in zip(axes, models):
        mine = [r for r in rows if r["model"] == kind and r["method"] != "dense"]
        key = "cosine" if kind == "minilm" else "ppl"
        patterns = list(dict.fromkeys(r["pattern"] for r in mine))
        series = list(dict.fromkeys((r["method"], r["recipe"]) for r in mine))
        width = 0.8 / max(1, len(series))
        for i, (method, recipe) in enumerate(series):
            got = {r["pattern"]: r[key] for r in mine if (r["method"], r["recipe"]) == (method, recipe)}
            xs = [p + (i - len(series) / 2 + 0.5) * width for p in range(len(patterns))]
            ax.bar(xs, [got.get(p, float("nan")) for p in patterns], width, label=f"{method} {recipe}")
        dense = next((r[key] for r in rows if r["model"] == kind and r["method"] == "dense"), None)
        if dense is not None:
            ax.axhline(dense, color="k", lw=1, ls="--", label="dense")
        ax.set_xticks(range(len(patterns)), patterns)
        if key == "ppl":
            top = max(r[key] for r in mine)
            ax.set_ylim(dense * 0.995 if dense else None, top * 1.01)
            ax.set_ylabel("held-out perplexity (lower is better)")
            ax.set_title("tiny causal LM (bench/tiny_lm.py)")
        else:
            lo = min(r[key] for r in mine)
            ax.set_ylim(max(0.0, lo - 0.05), 1.0)
            ax.set_ylabel("embedding cosine vs dense (higher is better)")
            ax.set_title("all-MiniLM-L6-v2, held-out sentences")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,lm")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--patterns", default="0.5,2:4,0.7")
    ap.add_argument("--recipes", default="none,dsnot,ls,br,all")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--append", action="store_true", help="add the rows to DIR/bench_quality.json's")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = args.recipes.split(",")
    for r in recipes:
        if r not in RECIPES:
            ap.error(f"--recipes: {r!r} is not one of {sorted(RECIPES)}")
    info = common.cpu_run_info(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    earlier = []
    if args.append and (out / "bench_quality.json").exists():
        earlier = json.loads((out / "bench_quality.json").read_text())["rows"]

    def save(rows):  # after every case, so an interrupted run keeps what it finished
        rows = with_ratios(earlier + [r for r in rows if not (earlier and r["method"] == "dense"
                                                               and any(e["method"] == "dense" and e["model"] == r["model"]
                                                                       for e in earlier))])
        (out / "bench_quality.json").write_text(json.dumps({"run": info, "rows": rows}, indent=2))
        md = (f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
              f"commit {info['commit']}, {info['date']}\n\n{table(rows)}\n")
        (out / "bench_quality.md").write_text(md)
        return md

    rows = run(args.models.split(","), args.methods.split(","), args.patterns.split(","), recipes, save=save)
    print("\n" + save(rows))
    try:
        plot(json.loads((out / "bench_quality.json").read_text())["rows"], out / "bench_quality.png")
    except ImportError:
        print("matplotlib is not installed: no PNG")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
