"""The `prunekit` command: prune / eval a local Hugging Face checkpoint, run the demo, list backends."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile

from .pipeline import METHODS, make_method
from .report import private_name


class CLIError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prune", help="prune a local Hugging Face checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--sparsity", required=True, help="a fraction (0.5, 50%%) or N:M (2:4)")
    p.add_argument("--calib", required=True, help="UTF-8 text file of calibration text")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--n-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: the model's maximum, at most 2048)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    p.add_argument("--include", nargs="+", default=None, help="layer-name patterns to prune")
    p.add_argument("--exclude", nargs="+", default=None, help="layer-name patterns to keep dense")
    p.add_argument("--device", default=None, help="where to compute (e.g. cuda); default: cpu")
    p.add_argument("--offload", action="store_true", help="keep the model on CPU, one block on --device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--plot", action="store_true", help="also write report.png (needs matplotlib)")
    p.set_defaults(run=_prune)

    s = commands.add_parser("prune-structured", help="remove attention heads / MLP channels (model shrinks)")
    s.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout)")
    s.add_argument("--heads", type=float, default=0.0, help="fraction of KV head groups to remove per block")
    s.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP channels to remove per block")
    s.add_argument("--importance", default="l2", choices=["l1", "l2", "taylor", "activation"])
    s.add_argument("--round-to", type=int, default=1, help="keep MLP widths a multiple of this (e.g. 64)")
    s.add_argument("--calib", default=None, help="calibration text file (taylor / activation)")
    s.add_argument("--n-samples", type=int, default=32, help="calibration windows (default 32)")
    s.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: model max, ≤2048)")
    s.add_argument("--out", required=True, help="output directory (written atomically)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(run=_prune_structured)

    e = commands.add_parser("eval", help="perplexity (causal LMs) and sparsity of a checkpoint")
    e.add_argument("--model", required=True, help="checkpoint directory")
    e.add_argument("--data", required=True, help="UTF-8 text file to evaluate on")
    e.add_argument("--seq-len", type=int, default=None, help="window length (default: model maximum, ≤2048)")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    e.add_argument("--reference", default=None,
                   help="dense checkpoint to compare sentence embeddings with (encoders)")
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(run=_eval)

    d = commands.add_parser("demo", help="prune all-MiniLM-L6-v2 with each method and compare fidelity")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.set_defaults(run=_demo)

    b = commands.add_parser("backends", help="which native/Triton/CUDA paths are live")
    b.set_defaults(run=_backends)
    return parser


# --------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str, device=None):
    """(model, tokenizer) from a local checkpoint directory, as a causal LM when it is one."""
    if not os.path.isdir(path):
        raise CLIError(f"--model {path!r} is not a directory")
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CLIError("loading checkpoints needs transformers: pip install 'prunekit[hf]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = AutoConfig.from_pretrained(path)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
        loader = AutoModelForCausalLM if causal else AutoModel
        dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
        model = loader.from_pretrained(path, **{dtype_key: "auto"}).eval()
    except Exception as exc:  # transformers raises many types for a broken checkpoint
        raise CLIError(f"cannot load a model from {path!r}: {type(exc).__name__}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CLIError(f"cannot load the tokenizer from {path!r}: {type(exc).__name__}: {exc}") from None
    if device is not None:
        model.to(device)
    return model, tokenizer


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _default_seq_len(model, requested: int | None) -> int:
    from . import data

    limit = data.max_positions(model)
    if requested is not None:
        return requested
    return min(limit, 2048) if limit else 2048


# ------------------------------------------------------------------------------------- prune
def _prune(args) -> int:
    from . import data
    from .pipeline import prune

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise CLIError(f"--out {out!r} already exists; pass --overwrite to replace it")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CLIError("--plot needs matplotlib: pip install 'prunekit[plot]'")
    method = make_method(args.method, args.sparsity)
    model, tokenizer = load_checkpoint(args.model)
    seq_len = _default_seq_len(model, args.seq_len)
    calibration = data.from_file(tokenizer, args.calib, args.n_samples, seq_len, args.seed)
    report = prune(model, method, calibration, include=args.include, exclude=args.exclude,
                   offload=args.offload, device=args.device, seed=args.seed, batch_size=args.batch_size,
                   progress=sys.stderr.isatty())
    _write_atomically(out, lambda folder: _save(folder, model, tokenizer, report, args.plot))
    print(report)
    print(f"wrote {out}")
    return 0


def _save(folder: str, model, tokenizer, report, plot: bool) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    report.to_json(os.path.join(folder, "report.json"))
    if plot:
        report.plot(os.path.join(folder, "report.png"))


def _write_atomically(out: str, write) -> None:
    """Writes into a temporary sibling directory, then renames it to `out`: the output appears
    complete or not at all. An existing `out` (with --overwrite) is swapped out, then removed."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = private_name(parent, f".{os.path.basename(out)}.tmp-")
    try:
        os.mkdir(tmp, 0o777)  # a normal folder's mode: the OS applies the umask
        write(tmp)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "previous"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune_structured(args) -> int:
    from . import data
    from .pruning.structured import prune_structured

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise CLIError(f"--out {out!r} already exists; pass --overwrite to replace it")
    if args.importance in ("taylor", "activation") and args.calib is None:
        raise CLIError(f"--importance {args.importance} needs --calib")
    model, tokenizer = load_checkpoint(args.model)
    calibration = None
    if args.calib is not None:
        calibration = data.from_file(tokenizer, args.calib, args.n_samples,
                                     _default_seq_len(model, args.seq_len), args.seed)
    report = prune_structured(model, heads=args.heads, mlp=args.mlp, importance=args.importance,
                              calibration=calibration, round_to=args.round_to)

    def save(folder: str) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "structured_report.json"), "w") as f:
            json.dump(report.to_dict(), f, indent=2)

    _write_atomically(out, save)
    print(report)
    print(f"wrote {out}")
    return 0


# -------------------------------------------------------------------------------------- eval
def _eval(args) -> int:
    from . import data, eval as pk_eval

    model, tokenizer = load_checkpoint(args.model, args.device)
    results: dict[str, object] = {"model": args.model, "sparsity": pk_eval.sparsity(model).total}
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        seq_len = _default_seq_len(model, args.seq_len)
        tokens = data.tokenize(tokenizer, data.read_texts(args.data))
        results["seq_len"] = seq_len
        results["perplexity"] = pk_eval.perplexity(model, tokens, seq_len=seq_len, batch_size=args.batch_size)
    if args.reference is not None:
        dense, _ = load_checkpoint(args.reference, args.device)
        batches = data.encode_sentences(tokenizer, data.read_texts(args.data))
        results.update(pk_eval.embedding_fidelity(dense, model, batches))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


# ----------------------------------------------------------------------------- demo, backends
def _demo(args) -> int:
    from . import demo

    demo.main(args.threads)
    return 0


def _backends(args) -> int:
    from ._native import backends

    print(json.dumps(backends(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
