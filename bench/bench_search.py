"""Searched per-layer sparsity vs uniform vs OWL on the real all-MiniLM-L6-v2 (CPU), and what the
search's variant cache saves per trial.

The demo's setup (prunekit/demo.py): calibrate on one half of the shipped English corpus (64 windows of
64 tokens), evaluate on the other half's sentences. For each method x overall sparsity:
  * uniform: prunekit.prune at the target;
  * OWL: prunekit.prune(..., allocation=prunekit.OWL()) (lam 0.08);
  * searched: prunekit.search_allocation(...) on the calibration windows (the last quarter held out
    for scoring), then prunekit.prune(..., allocation=<the result>);
each scored by the mean cosine of pruned vs dense sentence embeddings on the held-out sentences, and
the realized sparsity of the pruned layers. The search's wall and process-CPU seconds are recorded
(target: ≤ 10 minutes of CPU per search).

Caching: a cached trial (copy the chosen variants in, score) against the same trial done without the
cache (prunekit.prune a fresh copy with that allocation, then score it the same way): medians of
`--repeats` timings of each, side by side in one run.

    python bench/bench_search.py [--methods wanda,sparsegpt] [--targets 0.6,0.7] [--trials 150]
                                 [--threads N] [--repeats 3] [--out DIR]

Writes DIR/bench_search.json and DIR/bench_search.md (DIR defaults to bench/results) and, per case,
the search history (JSON) and its plot (PNG).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

import common  # noqa: E402
import prunekit as pk
from prunekit import data, demo
from prunekit import eval as pk_eval
from prunekit.pipeline import make_method
from prunekit.search.score import Fidelity


def prune_and_score(dense, method, target, calibration, held_out, reference, seed, allocation=None):
    model = copy.deepcopy(dense)
    report = pk.prune(model, make_method(method, target), calibration, seed=seed, progress=False, batch_size=16,
                      allocation=allocation)
    fidelity = pk_eval.compare_embeddings(reference, pk_eval.embed(model, held_out))
    return {"cosine": fidelity["cosine"], "nn_agreement": fidelity["nn_agreement"], "sparsity": report.sparsity}


def cache_speedup(dense, method, target, calibration, result, seed, repeats):
    """Seconds of one trial without the cache (prune a fresh copy to a trial's allocation, then score)
    vs the search's cached trials (median of its non-repeated trials), same scoring batches."""
    stat = calibration[: result.history["batches"]["statistics"] * 16]
    score = data.as_batches(calibration[len(stat):], batch_size=16)
    with torch.no_grad():
        fidelity = Fidelity(dense, score, "cosine", torch.device("cpu"))  # the dense outputs, as the search keeps them
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pk.prune(model, make_method(method, target), stat, seed=seed, progress=False, batch_size=16,
                     allocation=result)
        with torch.no_grad():
            fidelity.model = model
            fidelity.loss()
        times.append(time.perf_counter() - began)
    cached = result.history["seconds"]["trial_median"]
    uncached = statistics.median(times)
    return {"uncached_trial_s": uncached, "cached_trial_s": cached, "speedup": uncached / cached,
            "cache_build_s": result.history["seconds"]["statistics"] + result.history["seconds"]["variants"]}


def run(methods, targets, *, trials, repeats, out, n_samples=64, seq_len=64, seed=0, log=print, save=None):
    dense, tokenizer = demo.load_minilm()
    calib_text, eval_text = demo.split_sentences()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the text has .* calibration windows overlap")
        calibration = data.calibration_batches(tokenizer, calib_text, n_samples, seq_len, seed, special_tokens=True)
    held_out = data.encode_sentences(tokenizer, eval_text, batch_size=64)
    reference = pk_eval.embed(dense, held_out)
    rows = []
    for target in targets:
        for method in methods:
            row = {"method": method, "target": target}
            row["uniform"] = prune_and_score(dense, method, target, calibration, held_out, reference, seed)
            row["owl"] = prune_and_score(dense, method, target, calibration, held_out, reference, seed, pk.OWL())
            began, cpu = time.perf_counter(), time.process_time()
            result = pk.search_allocation(copy.deepcopy(dense), method, calibration, target=target, trials=trials,
                                          seed=seed, batch_size=16, progress=False)
            row["search_wall_s"], row["search_cpu_s"] = time.perf_counter() - began, time.process_time() - cpu
            row["searched"] = prune_and_score(dense, method, target, calibration, held_out, reference, seed, result)
            row["search_score"] = {"best": result.history["best"]["quality"],
                                   "uniform": result.history["uniform"]["quality"]}
            row["allocation_by_block"] = {g["name"]: result.history["allocation"][g["layers"][0]]
                                          for g in result.history["groups"]}
            row["cache"] = cache_speedup(dense, method, target, calibration, result, seed, repeats)
            stem = out / f"search_{method}_{target}"
            result.save_history(f"{stem}.json")
            result.plot(f"{stem}.png")
            rows.append(row)
            log(table(rows[-1:], header=len(rows) == 1), flush=True)
            if save is not None:
                save(rows)
    return rows


def table(rows, header=True) -> str:
    lines = []
    if header:
        lines = ["| method | target | uniform cos | OWL cos | searched cos | searched − best other | "
                 "realized sparsity u / OWL / s | search wall s | search CPU s | trial s cached / re-pruned (x) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u, o, s, c = r["uniform"], r["owl"], r["searched"], r["cache"]
        lines.append(f"| {r['method']} | {r['target']:.2f} | {u['cosine']:.4f} | {o['cosine']:.4f} | {s['cosine']:.4f} | "
                     f"{s['cosine'] - max(u['cosine'], o['cosine']):+.4f} | "
                     f"{u['sparsity']:.4f} / {o['sparsity']:.4f} / {s['sparsity']:.4f} | {r['search_wall_s']:.0f} | "
                     f"{r['search_cpu_s']:.0f} | {c['cached_trial_s']:.2f} / {c['uncached_trial_s']:.2f} "
                     f"({c['speedup']:.1f}x) |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--targets", default="0.6,0.7")
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.cpu_run_info(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(rows):  # after every case, so an interrupted run keeps what it finished
        (out / "bench_search.json").write_text(json.dumps({"run": info, "trials": args.trials, "rows": rows}, indent=2))
        md = (f"all-MiniLM-L6-v2, {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
              f"commit {info['commit']}, {info['date']}, {args.trials} trials per search\n\n{table(rows)}\n")
        (out / "bench_search.md").write_text(md)
        return md

    rows = run(args.methods.split(","), [float(t) for t in args.targets.split(",")], trials=args.trials,
               repeats=args.repeats, out=out, save=save)
    print("\n" + save(rows))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
