"""The search history as a PNG: each trial's quality (with the running best and the uniform allocation),
and the chosen sparsity of every layer against the target."""
from __future__ import annotations

import os


def plot_history(history: dict, path: str | os.PathLike) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting the search needs matplotlib: pip install 'prunekit[plot]'") from None
    trials = [t for t in history["trials"] if t.get("quality") is not None]
    higher = history["objective"] == "cosine"
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    xs = [t["number"] for t in trials]
    ys = [t["quality"] for t in trials]
    sparsity = [t["sparsity"] for t in trials]
    if max(sparsity, default=0) - min(sparsity, default=0) > 1e-9:  # only when trials differ in size
        fig.colorbar(left.scatter(xs, ys, c=sparsity, cmap="viridis", s=14, label="trial"), ax=left,
                     label="overall sparsity of the trial")
    else:
        left.scatter(xs, ys, s=14, color="tab:blue", label="trial")
    best, running = [], None
    for y in ys:
        running = y if running is None else (max(running, y) if higher else min(running, y))
        best.append(running)
    left.plot(xs, best, color="tab:red", label="best so far")
    left.axhline(history["uniform"]["quality"], color="gray", ls="--", label="uniform")
    left.set_xlabel("trial")
    left.set_ylabel(history["quality_name"] + (" (higher is better)" if higher else " (lower is better)"))
    left.set_title(f"{history['method'].split('(')[0]}, target sparsity {history['target']:.3f} (every trial meets it)",
                   fontsize=10)
    left.legend(loc="best", fontsize=8)
    names = list(history["allocation"])
    right.bar(range(len(names)), [history["allocation"][n] for n in names], color="tab:blue")
    right.axhline(history["target"], color="tab:red", ls="--", label="target")
    right.set_xticks(range(len(names)))
    prefix = os.path.commonprefix(names).rpartition(".")[0]
    right.set_xticklabels([n[len(prefix) + 1:] if prefix else n for n in names], rotation=90, fontsize=6)
    right.set_ylabel("sparsity")
    right.set_title("chosen allocation per layer")
    right.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

