"""Prune, then retrain: lottery-ticket rewinding vs pruning and fine-tuning vs dense, on real text.

A character-level language model (an MLP over the previous CONTEXT characters, Bengio et al. 2003
style) learns prunekit/assets/english.txt (23 KB of English sentences; the last 10% held out). Its
three linear layers are pruned by global magnitude to the same final sparsity in several ways:

  dense          trained STEPS steps, not pruned (round 0 of every IMP run)
  imp-rewind     IMP, rewinding the survivors to step REWIND of the first training (late rewinding),
                 then retraining STEPS - REWIND steps each round           (rewind=k)
  imp-init       IMP, rewinding to initialization, STEPS steps per round (the original lottery ticket)
  imp-finetune   IMP without rewinding: each round fine-tunes the pruned trained weights FT steps at lr/10
  oneshot-ft     the dense model pruned once to the final sparsity (as many weights as IMP pruned),
                 fine-tuned ROUNDS x FT steps at lr/10
  random-reinit  the final imp-rewind mask on freshly initialized weights, trained STEPS steps

The metric is the held-out cross-entropy in bits per character (lower is better), mean over seeds.
Every training step draws a fresh AdamW (the optimizer state is not rewound). Runs on the CPU in
about 2 minutes of CPU time (one thread):  python bench/imp_experiment.py [--seeds 2] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.train.imp import plot_rounds, prune_remaining

CONTEXT = 12
METRIC = "held-out bits/char"


def load_text() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = resources.files("prunekit").joinpath("assets/english.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split - CONTEXT:], len(chars)


class CharMLP(nn.Module):
    """Embeddings of the last CONTEXT characters -> two hidden layers (dropout: the text is small)."""

    def __init__(self, vocab: int, embed: int = 16, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.fc1 = nn.Linear(CONTEXT * embed, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)
        self.drop = nn.Dropout(dropout)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        h = self.embed(context).flatten(1)
        h = self.drop(F.relu(self.fc1(h)))
        h = self.drop(F.relu(self.fc2(h)))
        return self.out(h)


def windows(ids: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(CONTEXT)
    return ids[starts[:, None] + offsets], ids[starts + CONTEXT]


@torch.no_grad()
def bits_per_char(model: nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    x, y = windows(ids, torch.arange(len(ids) - CONTEXT))
    loss = F.cross_entropy(model(x), y).item()
    model.train()
    return loss / math.log(2)


class Trainer:
    """AdamW (weight decay 0.1, a fresh optimizer per call) on random windows of the training text; the
    data order depends on (seed, round) only."""

    def __init__(self, train_ids, val_ids, args, seed: int):
        self.train_ids, self.val_ids, self.args, self.seed = train_ids, val_ids, args, seed

    def run(self, model, steps: range, lr: float, data_seed: int, ctx=None) -> float:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1000 * self.seed + data_seed)
        for _ in steps:
            starts = torch.randint(0, len(self.train_ids) - CONTEXT, (self.args.batch,), generator=gen)
            x, y = windows(self.train_ids, starts)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ctx is not None:
                ctx.step()
        return bits_per_char(model, self.val_ids)


def new_model(vocab: int, seed: int) -> CharMLP:
    torch.manual_seed(seed)
    return CharMLP(vocab)


def one_seed(seed: int, args, train_ids, val_ids, vocab: int) -> dict:
    t = Trainer(train_ids, val_ids, args, seed)
    out: dict = {}
    include = ["fc1", "fc2", "out"]
    dense_state: dict = {}

    def imp(rewind, fine_tune: bool):
        def train_fn(model, ctx):
            if fine_tune and ctx.index > 0:
                return {METRIC: t.run(model, range(args.ft_steps), args.lr / 10, ctx.index, ctx)}
            bpc = t.run(model, range(ctx.start_step, args.steps), args.lr, ctx.index, ctx)
            if ctx.index == 0:  # round 0 is the dense run (same init, data and dropout draws in every IMP run)
                dense_state.update({k: v.clone() for k, v in model.state_dict().items()})
            return {METRIC: bpc}
        model = new_model(vocab, seed)
        began = time.perf_counter()
        result = pk.iterative_magnitude(model, train_fn, rounds=args.rounds, fraction=args.fraction,
                                        rewind=rewind, include=include, progress=False)
        return result, time.perf_counter() - began

    for label, rewind, fine_tune in (("imp-rewind", args.rewind, False), ("imp-init", "init", False),
                                     ("imp-finetune", None, True)):
        result, seconds = imp(rewind, fine_tune)
        out[label] = {"rounds": [{"sparsity": r.sparsity, "bpc": r.metric[METRIC]} for r in result.rounds],
                      "seconds": seconds, "result": result}
        print(f"seed {seed} {label:13s} " + " ".join(f"{r.sparsity:.3f}:{r.metric[METRIC]:.4f}"
                                                        for r in result.rounds) + f"  ({seconds:.0f} s)", flush=True)
    final_masks = out["imp-rewind"]["result"].masks
    out["dense"] = {"sparsity": 0.0, "bpc": out["imp-rewind"]["rounds"][0]["bpc"]}

    began = time.perf_counter()
    dense = new_model(vocab, seed)
    dense.load_state_dict(dense_state)
    ones = pk.Masks({n: torch.ones_like(dense.get_submodule(n).weight, dtype=torch.bool) for n in include})
    target = ones.total - final_masks.kept           # prune as many weights as IMP did, in one go
    oneshot = prune_remaining(dense, ones, (target + 0.5) / ones.total, "global")
    mt = pk.MaskedTraining.from_masks(dense, oneshot)
    pruned_bpc = bits_per_char(dense, val_ids)
    ft_bpc = t.run(dense, range(args.rounds * args.ft_steps), args.lr / 10, 1, mt)
    mt.finalize()
    out["oneshot-ft"] = {"sparsity": oneshot.sparsity, "bpc": ft_bpc, "bpc_before_ft": pruned_bpc,
                         "seconds": time.perf_counter() - began}

    began = time.perf_counter()
    random = new_model(vocab, seed)
    pk.reinitialize(random, final_masks, seed=10_000 + seed)
    mt = pk.MaskedTraining.from_masks(random, final_masks)
    out["random-reinit"] = {"sparsity": final_masks.sparsity, "bpc": t.run(random, range(args.steps), args.lr, 0, mt),
                            "seconds": time.perf_counter() - began}
    mt.finalize()
    print(f"seed {seed} oneshot-ft {ft_bpc:.4f} (pruned, before ft {pruned_bpc:.4f})  "
          f"random-reinit {out['random-reinit']['bpc']:.4f}", flush=True)
    return out


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of a full run")
    parser.add_argument("--rewind", type=int, default=50, help="imp-rewind: the step to rewind to")
    parser.add_argument("--ft-steps", type=int, default=400, help="fine-tuning steps per pruning round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the remaining weights pruned per round")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_ids, val_ids, vocab = load_text()
    began, cpu = time.perf_counter(), time.process_time()
    runs = [one_seed(seed, args, train_ids, val_ids, vocab) for seed in range(args.seeds)]
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu

    imp_labels = ("imp-rewind", "imp-init", "imp-finetune")
    lines = [f"| sparsity | {' | '.join(imp_labels)} |", "|---|" + "---|" * len(imp_labels)]
    for i in range(args.rounds + 1):
        cells = [mean_sd([r[label]["rounds"][i]["bpc"] for r in runs]) for label in imp_labels]
        lines.append(f"| {runs[0]['imp-rewind']['rounds'][i]['sparsity']:.3f} | {' | '.join(cells)} |")
    per_round = "\n".join(lines)
    final = [("dense", "dense"), ("imp-rewind", f"IMP, rewind to step {args.rewind}, retrain"),
             ("imp-init", "IMP, rewind to init, retrain"), ("imp-finetune", "IMP, fine-tune each round"),
             ("oneshot-ft", "one-shot prune + fine-tune"), ("random-reinit", "IMP mask, random re-init, retrain")]
    rows = ["| run | sparsity | held-out bits/char |", "|---|---|---|"]
    for key, text in final:
        if key.startswith("imp-"):
            sp, bpc = runs[0][key]["rounds"][-1]["sparsity"], [r[key]["rounds"][-1]["bpc"] for r in runs]
        else:
            sp, bpc = runs[0][key]["sparsity"], [r[key]["bpc"] for r in runs]
        rows.append(f"| {text} | {sp:.3f} | {mean_sd(bpc)} |")
    rows.append(f"| (one-shot pruned, before fine-tuning) | {runs[0]['oneshot-ft']['sparsity']:.3f} | "
                f"{mean_sd([r['oneshot-ft']['bpc_before_ft'] for r in runs])} |")
    summary = "\n".join(rows)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    info = (f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
            f"commit {commit}, {args.seeds} seed(s), {seconds:.0f} s wall, {cpu:.0f} s CPU")
    print(f"\n{info}\n\nAt the final sparsity:\n{summary}\n\nPer IMP round:\n{per_round}")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "imp_experiment.json"), "w") as f:
        json.dump({"args": vars(args), "info": info, "runs": [{k: {kk: vv for kk, vv in v.items() if kk != "result"}
                                                               for k, v in r.items()} for r in runs]}, f, indent=1)
    try:
        plot_rounds({label: runs[0][label]["result"] for label in imp_labels},
                    os.path.join(args.out, "imp_experiment.png"))
    except ImportError as exc:
        print(f"(no plot: {exc})")


if __name__ == "__main__":
    main()
