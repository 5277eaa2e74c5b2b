"""The `prunekit` command: prune / eval a local Hugging Face checkpoint, run the demo, list backends.

Every argument (paths, device, sparsity, sizes) is checked before a model is loaded; a problem is
reported as one line (`prunekit: error: ...`, exit status 1; 2 for a malformed command line). Ctrl-C
ends with one line (status 130), SIGTERM too (143); an interrupted write leaves no partial output.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile

from .distributed import launch
from .distributed.group import rank_device
from .pipeline import METHODS
from .report import private_name


class CLIError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so that cleanup (`finally`, temporary folders) runs."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    previous = _on_sigterm()
    try:
        return args.run(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError,
            NotADirectoryError, PermissionError) as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except _Terminated:
        _say("terminated")
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _say(message: str) -> None:
    print("prunekit: " + " ".join(str(message).split()), file=sys.stderr)


def _on_sigterm():
    """Turns SIGTERM into an exception (main thread only); returns the handler it replaced."""
    def handler(signum, frame):
        raise _Terminated()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) like 0.25 or '25%', got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunekit", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("prune", help="prune a local Hugging Face checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--sparsity", required=True, help="a fraction in [0, 1) (0.5, 50%%) or N:M (2:4)")
    p.add_argument("--calib", default=None,
                   help="UTF-8 text file of calibration text, read as given (required for wanda and "
                        "sparsegpt; for magnitude only to measure the reconstruction error)")
    p.add_argument("--out", required=True, help="output directory (written atomically; not --model)")
    p.add_argument("--n-samples", type=_positive, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=_positive, default=None,
                   help="tokens per window (default: the model's maximum, at most 2048)")
    p.add_argument("--batch-size", type=_positive, default=1, help="windows per forward (default 1)")
    p.add_argument("--blocksize", type=_positive, default=None,
                   help="sparsegpt: columns per block (default 128)")
    p.add_argument("--include", nargs="+", default=None,
                   help="layer-name patterns to prune (shell globs; 're:' prefix for a regular expression)")
    p.add_argument("--exclude", nargs="+", default=None, help="layer-name patterns to keep dense (as --include)")
    p.add_argument("--owl", nargs="?", const=0.08, type=float, default=None, metavar="LAMBDA",
                   help="per-block sparsity from outlier ratios (OWL); LAMBDA is the spread (default 0.08)")
    p.add_argument("--allocation", default=None, metavar="RULES.json",
                   help="per-layer sparsity: a JSON object {layer-name pattern: sparsity}, first match wins")
    p.add_argument("--quant-bits", type=int, default=None,
                   help="sparsegpt: quantize jointly to this many bits (2..8); the saved weights are the "
                        "dequantized values")
    p.add_argument("--quant-groupsize", type=int, default=-1, help="input columns per scale (-1: per row)")
    p.add_argument("--recover-steps", type=_positive, default=None,
                   help="after pruning, distill from the dense model for this many steps on the "
                        "calibration windows (holds a dense copy in memory)")
    p.add_argument("--recover-lr", type=float, default=2e-5, help="learning rate of --recover-steps")
    p.add_argument("--format", choices=["prunekit", "hf", "sparse24", "compressed-tensors"], default="prunekit",
                   help="prunekit (default): save_pretrained layout (dense weights with the zeros: loads with "
                        "from_pretrained) and, for a 2:4 pattern, prunekit's packed copy in OUT/sparse24/ "
                        "(prunekit.load(OUT)); hf: the dense layout only; sparse24: as prunekit, refusing a "
                        "pattern that is not 2:4; compressed-tensors: that format (transformers, vLLM), "
                        "--quant-bits layers as packed integer codes (pip install 'prunekit[compressed-tensors]')")
    p.add_argument("--device", default=None, help="where to compute (cpu, cuda, cuda:1, ...); default: cpu")
    p.add_argument("--offload", action="store_true", help="keep the model on CPU, one block on --device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--plot", action="store_true", help="also write report.png (needs matplotlib)")
    p.set_defaults(run=_prune_command)

    s = commands.add_parser("prune-structured", help="remove attention heads / MLP channels (model shrinks)")
    s.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout)")
    s.add_argument("--heads", type=_fraction, default=0.0, help="fraction of KV head groups to remove per block")
    s.add_argument("--mlp", type=_fraction, default=0.0, help="fraction of MLP channels to remove per block")
    s.add_argument("--importance", default="l2", choices=["l1", "l2", "taylor", "activation"])
    s.add_argument("--round-to", type=_positive, default=1, help="keep MLP widths a multiple of this (e.g. 64)")
    s.add_argument("--calib", default=None, help="calibration text file, read as given (taylor / activation)")
    s.add_argument("--n-samples", type=_positive, default=32, help="calibration windows (default 32)")
    s.add_argument("--seq-len", type=_positive, default=None, help="tokens per window (default: model max, ≤2048)")
    s.add_argument("--out", required=True, help="output directory (written atomically; not --model)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(run=_prune_structured)

    e = commands.add_parser("eval", help="perplexity (causal LMs) and sparsity of a checkpoint")
    e.add_argument("--model", required=True, help="checkpoint directory")
    e.add_argument("--data", required=True,
                   help="UTF-8 text file: perplexity is measured on its text exactly as given (no line "
                        "stripping or joining); with --reference each non-empty line is one sentence")
    e.add_argument("--seq-len", type=_positive, default=None, help="window length (default: model maximum, ≤2048)")
    e.add_argument("--batch-size", type=_positive, default=1, help="windows per forward (default 1)")
    e.add_argument("--reference", default=None,
                   help="dense checkpoint to compare sentence embeddings with (encoders)")
    e.add_argument("--device", default=None, help="where to compute (cpu, cuda, cuda:1, ...)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(run=_eval)

    d = commands.add_parser("demo", help="prune all-MiniLM-L6-v2 with each method and compare fidelity")
    d.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    d.set_defaults(run=_demo)

    b = commands.add_parser("backends", help="which native/Triton/CUDA paths are live")
    b.set_defaults(run=_backends)

    from .selftest import add_parser as add_selftest  # every kernel vs its reference (selftest.py)
    add_selftest(commands)
    from .search.cli import add_parser as add_search  # per-layer sparsity search (search/cli.py)
    add_search(commands)
    return parser


# ------------------------------------------------------------------------------- argument checks
def _check_checkpoint(path: str, flag: str = "--model") -> None:
    if not os.path.exists(path):
        raise CLIError(f"{flag} {path!r} does not exist")
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is not a directory (expected a save_pretrained checkpoint folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"{flag} {path!r} has no config.json; expected a save_pretrained checkpoint folder")


def _check_seq_len(model: str, seq_len: int | None) -> None:
    """--seq-len against the checkpoint's config.json (read as JSON: no model is loaded)."""
    if seq_len is None:
        return
    try:
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # a broken config is reported when the model loads
    if not isinstance(config, dict):
        return
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
            limit = source.get(key) if isinstance(source, dict) else None
            if isinstance(limit, int) and limit > 0:
                if seq_len > limit:
                    raise CLIError(f"--seq-len {seq_len} is longer than the model supports ({limit} positions)")
                return


def _check_text_file(path: str | None, flag: str) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r} is not a file" if os.path.exists(path) else f"{flag} {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise CLIError(f"{flag} {path!r} is not readable")


def _check_out(out: str, model: str, overwrite: bool) -> str:
    out = os.path.abspath(out)
    real_out, real_model = os.path.realpath(out), os.path.realpath(model)
    if real_out == real_model:
        raise CLIError(f"--out {out!r} is the --model folder; write the result somewhere else")
    if os.path.commonpath([real_out, real_model]) == real_out:
        raise CLIError(f"--out {out!r} contains --model; replacing it would delete the model being read")
    if os.path.exists(out) and not overwrite:
        raise CLIError(f"--out {out!r} already exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out!r} exists and is not a directory")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out!r}: cannot create it ({parent!r} is not a writable directory)")
    return out


def check_device(text: str | None):
    """A torch.device for --device, or a CLIError saying why it cannot be used here."""
    import torch

    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {text!r} is not a device; expected cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise CLIError("--device meta holds no data; choose cpu or an accelerator")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise CLIError(f"--device {text}: this PyTorch ({torch.__version__}) is built without CUDA; "
                           f"install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise CLIError(f"--device {text}: no CUDA device is available here (no GPU or NVIDIA driver)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s)")
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        raise CLIError(f"--device {text}: {device.type} is not available in this PyTorch ({torch.__version__})")
    return device


def _method(args):
    """The pruning method from --method/--sparsity/--blocksize/--quant-*, before any model is loaded."""
    import prunekit as pk

    if args.blocksize is not None and args.method != "sparsegpt":
        raise CLIError("--blocksize applies to --method sparsegpt only")
    if args.quant_bits is not None and args.method != "sparsegpt":
        raise CLIError("--quant-bits: joint quantization is done by --method sparsegpt only")
    if args.quant_bits is None and args.quant_groupsize != -1:
        raise CLIError("--quant-groupsize needs --quant-bits")
    if args.method != "sparsegpt":
        return getattr(pk, METHODS[args.method])(args.sparsity)
    kwargs = {}
    if args.blocksize is not None:
        kwargs["blocksize"] = args.blocksize
    if args.quant_bits is not None:
        kwargs["quant"] = pk.QuantSpec(bits=args.quant_bits, groupsize=args.quant_groupsize)
    return pk.SparseGPT(args.sparsity, **kwargs)


def _allocation(args, method):
    import prunekit as pk

    if args.owl is not None and args.allocation is not None:
        raise CLIError("--owl and --allocation are alternatives; give one")
    if method.pattern.is_nm and (args.owl is not None or args.allocation is not None):
        raise CLIError(f"--owl / --allocation vary an unstructured sparsity; {method.pattern} is N:M")
    if args.owl is not None:
        return pk.OWL(lam=args.owl)
    if args.allocation is None:
        return None
    _check_text_file(args.allocation, "--allocation")
    try:
        with open(args.allocation, encoding="utf-8") as f:
            rules = json.load(f)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--allocation {args.allocation!r} is not valid JSON ({exc})") from None
    if not isinstance(rules, dict):
        raise CLIError(f"--allocation {args.allocation!r}: expected a JSON object {{pattern: sparsity}}")
    return pk.LayerSparsity(rules)


# --------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str, device=None):
    """(model, tokenizer) from a local checkpoint directory, as a causal LM when it is one."""
    _check_checkpoint(path)
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise CLIError("loading checkpoints needs transformers: pip install 'prunekit[hf]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not _progress():  # transformers' own bars (loading, saving) follow the same rule as prunekit's
        transformers.utils.logging.disable_progress_bar()
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


def _progress() -> bool:
    return sys.stderr.isatty()


# ------------------------------------------------------------------------------------- prune
def _prune(args) -> int:
    _check_checkpoint(args.model)
    _check_seq_len(args.model, args.seq_len)
    out = _check_out(args.out, args.model, args.overwrite)
    _check_text_file(args.calib, "--calib")
    if args.calib is None and args.method != "magnitude":
        raise CLIError(f"--method {args.method} needs calibration text: pass --calib FILE")
    if args.calib is None and args.recover_steps is not None:
        raise CLIError("--recover-steps trains on the calibration text: pass --calib FILE")
    device = check_device(args.device)
    if launch.world_size() > 1:  # torchrun: this process's GPU; prunekit.prune runs across the ranks
        device = rank_device(device)
        if args.recover_steps is not None:
            raise CLIError("--recover-steps trains in one process; run it without torchrun")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise CLIError("--plot needs matplotlib: pip install 'prunekit[plot]'")
    method = _method(args)
    allocation = _allocation(args, method)
    _check_format(args, method)

    from . import data
    from .pipeline import prune

    model, tokenizer = load_checkpoint(args.model)
    seq_len = _default_seq_len(model, args.seq_len)
    calibration = None
    if args.calib is not None:
        calibration = data.from_file(tokenizer, args.calib, args.n_samples, seq_len, args.seed)
    teacher = None
    if args.recover_steps is not None:
        import copy
        teacher = copy.deepcopy(model)
    report = prune(model, method, calibration, include=args.include, exclude=args.exclude,
                   offload=args.offload, device=device, seed=args.seed, batch_size=args.batch_size,
                   progress=_progress(), allocation=allocation)
    if teacher is not None:
        from .train.distill import recover

        if device is not None:
            model.to(device)
            teacher.to(device)
        recover(model, teacher, calibration, args.recover_steps, args.recover_lr, batch_size=args.batch_size,
                include=args.include, exclude=args.exclude, progress=_progress())
        model.to("cpu")
        del teacher
    described = _calibration_text(args, calibration)
    launch.on_rank0(lambda: _write_atomically(
        out, lambda folder: _save(folder, model, tokenizer, report, args.plot, args.format, described)))
    if launch.rank() == 0:
        print(report)
        print(f"wrote {out}")
    return 0


def _prune_command(args) -> int:
    """`prunekit prune`; under torchrun (WORLD_SIZE > 1) in a process group made for the command."""
    with launch.process_group(rank_device(check_device(args.device))):
        return _prune(args)


def _check_format(args, method) -> None:
    """--format against the other arguments, before a model is loaded."""
    if args.format == "sparse24" and not (method.pattern.is_nm and (method.pattern.n, method.pattern.m) == (2, 4)):
        raise CLIError(f"--format sparse24 stores 2:4 weights; --sparsity {args.sparsity} is not 2:4")
    if args.format == "compressed-tensors":
        if importlib.util.find_spec("compressed_tensors") is None:
            raise CLIError("--format compressed-tensors needs the compressed-tensors package: "
                           "pip install 'prunekit[compressed-tensors]'")
        if args.quant_bits is not None and args.recover_steps is not None:
            raise CLIError("--format compressed-tensors stores --quant-bits weights as integer codes, and "
                           "--recover-steps trains them off that grid; drop one of the two")


def _calibration_text(args, calibration) -> str | None:
    """The calibration, as the model card states it."""
    if calibration is None:
        return None
    shape = getattr(calibration, "shape", None)
    size = f"{shape[0]} windows x {shape[1]} tokens" if shape is not None and len(shape) == 2 else "windows"
    return f"{size} of {os.path.basename(args.calib)} (seed {args.seed})"


def _save(folder: str, model, tokenizer, report, plot: bool, fmt: str = "prunekit",
          calibration: str | None = None) -> None:
    from .export.model_card import write_model_card

    if fmt == "compressed-tensors":
        from .export.compressed_tensors import export_compressed_tensors

        export_compressed_tensors(model, folder, report, tokenizer=tokenizer, calibration=calibration)
    else:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        report.to_json(os.path.join(folder, "report.json"))
        write_model_card(folder, report, model=model, fmt="hf" if fmt == "hf" else "prunekit",
                         calibration=calibration)
    if plot:
        report.plot(os.path.join(folder, "report.png"))
    if fmt == "sparse24" or (fmt == "prunekit" and report.pattern == "2:4"):
        from . import io
        from .nn.swap import sparsify

        sparsify(model)  # in place, no second copy in memory: the dense layout is written and the command ends
        io.save(model, os.path.join(folder, io.PACKED_DIR))


def _write_atomically(out: str, write) -> None:
    """Writes into a temporary sibling directory, then renames it to `out`: the output appears
    complete or not at all. An existing `out` (with --overwrite) is swapped out, then removed.
    An interruption (Ctrl-C, SIGTERM through main) removes the temporary directory."""
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
    _check_checkpoint(args.model)
    _check_seq_len(args.model, args.seq_len)
    out = _check_out(args.out, args.model, args.overwrite)
    _check_text_file(args.calib, "--calib")
    if args.importance in ("taylor", "activation") and args.calib is None:
        raise CLIError(f"--importance {args.importance} needs --calib")

    from . import data
    from .pruning.structured import prune_structured

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
    _check_checkpoint(args.model)
    _check_seq_len(args.model, args.seq_len)
    _check_text_file(args.data, "--data")
    if args.reference is not None:
        _check_checkpoint(args.reference, "--reference")
    device = check_device(args.device)

    from . import data, eval as pk_eval

    model, tokenizer = load_checkpoint(args.model, device)
    results: dict[str, object] = {"model": args.model, "sparsity": pk_eval.sparsity(model).total}
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        seq_len = _default_seq_len(model, args.seq_len)
        tokens = data.tokenize(tokenizer, data.read_text(args.data))
        results["seq_len"] = seq_len
        results["perplexity"] = pk_eval.perplexity(model, tokens, seq_len=seq_len, batch_size=args.batch_size,
                                                   progress=_progress())
    if args.reference is not None:
        dense, _ = load_checkpoint(args.reference, device)
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
