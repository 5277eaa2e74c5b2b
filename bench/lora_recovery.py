"""Quality of structured pruning on all-MiniLM-L6-v2 before and after LoRA recovery (CPU, a few minutes).

    python bench/lora_recovery.py [--steps 150] [--threads 2] [--only 0 1 5]

Each row prunes a fresh copy of the dense encoder (LoRAPrune trains its own adapters while it prunes,
on the same training sentences), measures the held-out embedding fidelity (mean
cosine to the dense embedding, nearest-neighbour agreement; prunekit.eval.compare_embeddings on the
demo's held-out half of assets/english.txt), then runs prunekit.recover_lora (rank 8 on every linear
layer, embedding distillation against the dense model on the calibration half, merged) and measures
again. Prints a markdown table for the README.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import prunekit as pk
from prunekit import data, demo, eval as pk_eval


def configs(dense, train, args):
    """(name, prune(model, calib)) rows; every row prunes a fresh copy of the dense encoder."""
    def loraprune(m, c):
        # LoRAPrune trains its adapters (embedding distillation against the dense model) while it prunes
        pk.loraprune(m, train, mlp=0.5, steps=args.lp_steps, iterations=3, lr=args.lr, r=8, teacher=dense,
                     progress=False)

    return [
        ("structured l2, MLP 50%", lambda m, c: pk.prune_structured(m, mlp=0.5, importance="l2")),
        ("structured activation, MLP 50%",
         lambda m, c: pk.prune_structured(m, mlp=0.5, importance="activation", calibration=c)),
        ("structured activation, MLP 75%",
         lambda m, c: pk.prune_structured(m, mlp=0.75, importance="activation", calibration=c)),
        ("depth angular, 2 of 6 blocks", lambda m, c: pk.prune_depth(m, c, n_blocks=2, importance="angular")),
        ("unstructured Wanda 50% (reference)", lambda m, c: pk.prune(m, pk.Wanda(0.5), c, progress=False)),
        (f"LoRAPrune MLP 50% ({args.lp_steps} steps)", loraprune),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run these configs (indices)")
    parser.add_argument("--batch", type=int, default=16, help="training sentences per step")
    parser.add_argument("--lp-steps", type=int, default=30, help="LoRAPrune's own training steps while it prunes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tokenizer = demo.load_minilm()
    calib_text, eval_text = demo.split_sentences()
    calib = data.calibration_batches(tokenizer, calib_text, 64, 64, 0, special_tokens=True)
    train = data.encode_sentences(tokenizer, calib_text, batch_size=args.batch)
    held_out = data.encode_sentences(tokenizer, eval_text, batch_size=64)
    reference = pk_eval.embed(dense, held_out)
    n_dense = sum(p.numel() for p in dense.parameters())
    rows = []
    for index, (name, prune) in enumerate(configs(dense, train, args)):
        if args.only is not None and index not in args.only:
            continue
        model = copy.deepcopy(dense)
        prune(model, calib)
        before = pk_eval.compare_embeddings(reference, pk_eval.embed(model, held_out))
        began = time.perf_counter()
        report = pk.recover_lora(model, dense, train, steps=args.steps, lr=args.lr, r=8, progress=False)
        seconds = time.perf_counter() - began
        after = pk_eval.compare_embeddings(reference, pk_eval.embed(model, held_out))
        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        rows.append((name, params / n_dense, nonzero / n_dense, before, after, report.delta_dropped, seconds))
        print(f"{name}: cos {before['cosine']:.4f} -> {after['cosine']:.4f}, nn {before['nn_agreement']:.3f} -> "
              f"{after['nn_agreement']:.3f}, loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}, "
              f"dropped {report.delta_dropped:.3f}, {seconds:.0f} s", flush=True)
    print(f"\nall-MiniLM-L6-v2 ({n_dense:,} params), recover_lora rank 8, {args.steps} steps of {args.batch} "
          f"sentences, lr {args.lr}, "
          f"{len(eval_text)} held-out sentences, torch threads {torch.get_num_threads()}\n")
    print("| method | params kept | nonzero kept | cosine before | cosine after | NN-agree before | NN-agree after "
          "| delta dropped at merge |")
    print("|---|---|---|---|---|---|---|---|")
    for name, kept, nonzero, before, after, dropped, _ in rows:
        print(f"| {name} | {kept:.1%} | {nonzero:.1%} | {before['cosine']:.4f} | {after['cosine']:.4f} | "
              f"{before['nn_agreement']:.3f} | {after['nn_agreement']:.3f} | {dropped:.1%} |")


if __name__ == "__main__":
    main()
