"""`prunekit search`: search a per-layer sparsity allocation for a local checkpoint and write the JSON file
that `prunekit prune --allocation FILE` reads (prunekit.search_allocation does the work)."""
from __future__ import annotations

import importlib.util
import os


def add_parser(commands) -> None:
    """Registers the `search` subcommand on the CLI's subparsers (prunekit/cli.py)."""
    from ..cli import _fraction, _positive
    from ..pipeline import METHODS
    from .score import OBJECTIVES
    from .space import GRANULARITIES

    p = commands.add_parser("search", help="search per-layer sparsities that meet an overall target exactly "
                                           "(writes the file prune --allocation reads)")
    p.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=_fraction, help="the overall target sparsity, a fraction in [0, 1) (0.6, 60%%)")
    target.add_argument("--kept", type=_positive, help="or: the number of targeted weights to keep")
    target.add_argument("--latency-ms", type=float, help="a latency budget: not supported yet (refused)")
    p.add_argument("--calib", required=True, help="UTF-8 text file of calibration text, read as given")
    p.add_argument("--out", required=True, metavar="ALLOCATION.json",
                   help="where to write the allocation {layer name: sparsity} for prune --allocation")
    p.add_argument("--trials", type=_positive, default=100, help="optuna trials (default 100; the first is uniform)")
    p.add_argument("--objective", choices=OBJECTIVES, default="auto",
                   help="reward: kl (LMs), cosine (encoders), mse; auto picks by the model's outputs")
    p.add_argument("--granularity", choices=GRANULARITIES, default="block", help="one sparsity per block or per layer")
    p.add_argument("--step", type=float, default=0.05, help="spacing of the sparsity ladder (default 0.05)")
    p.add_argument("--spread", type=float, default=0.15, help="largest deviation from the target (default 0.15)")
    p.add_argument("--holdout", type=float, default=0.25, help="share of calibration batches held out for scoring")
    p.add_argument("--n-samples", type=_positive, default=64, help="calibration windows (default 64)")
    p.add_argument("--seq-len", type=_positive, default=None, help="tokens per window (default: model max, ≤2048)")
    p.add_argument("--batch-size", type=_positive, default=8, help="windows per forward (default 8)")
    p.add_argument("--include", nargs="+", default=None, help="layer-name patterns to prune (as for prune)")
    p.add_argument("--exclude", nargs="+", default=None, help="layer-name patterns to keep dense (as for prune)")
    p.add_argument("--device", default=None, help="where to compute (cpu, cuda, ...); default: cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", default=None, metavar="FILE.json", help="also write every trial as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also plot the search (needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --history / --plot if they exist")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..cli import CLIError, _check_checkpoint, _check_seq_len, _check_text_file, _progress, check_device

    if args.latency_ms is not None:
        raise CLIError("--latency-ms: latency budgets are not supported by prunekit search yet (no per-layer "
                       "latency model of the sparse kernels); give --sparsity or --kept")
    for flag, value, low, high in (("--step", args.step, 0.0, 1.0), ("--spread", args.spread, -1e-12, 1.0),
                                   ("--holdout", args.holdout, 0.0, 1.0)):
        if not low < value < high:
            raise CLIError(f"{flag} {value:g}: expected a fraction in {'[0, 1)' if flag == '--spread' else '(0, 1)'}")
    _check_checkpoint(args.model)
    _check_seq_len(args.model, args.seq_len)
    _check_text_file(args.calib, "--calib")
    outputs = [_check_file_out(args.out, "--out", args.overwrite)]
    if args.history is not None:
        outputs.append(_check_file_out(args.history, "--history", args.overwrite))
    if args.plot is not None:
        outputs.append(_check_file_out(args.plot, "--plot", args.overwrite))
        if importlib.util.find_spec("matplotlib") is None:
            raise CLIError("--plot needs matplotlib: pip install 'prunekit[plot]'")
    if len(set(outputs)) != len(outputs):
        raise CLIError("--out, --history and --plot must be different files")
    if importlib.util.find_spec("optuna") is None:
        raise CLIError("prunekit search needs optuna: pip install 'prunekit[search]'")
    device = check_device(args.device)

    from .. import data
    from ..cli import _default_seq_len, load_checkpoint
    from .run import search_allocation

    model, tokenizer = load_checkpoint(args.model)
    calibration = data.from_file(tokenizer, args.calib, args.n_samples, _default_seq_len(model, args.seq_len),
                                 args.seed)
    result = search_allocation(model, args.method, calibration, target=args.sparsity, kept=args.kept,
                               objective=args.objective, trials=args.trials, seed=args.seed,
                               granularity=args.granularity, step=args.step, spread=args.spread,
                               holdout=args.holdout, include=args.include, exclude=args.exclude, device=device,
                               batch_size=args.batch_size, progress=_progress())
    result.save(args.out)
    if args.history is not None:
        result.save_history(args.history)
    if args.plot is not None:
        result.plot(args.plot)
    h = result.history
    print(f"target sparsity {h['target']:.4f} ({h['kept']:.0f} of {h['weights']} weights kept), "
          f"{h['quality_name']}: searched {h['best']['quality']:.4f}, uniform {h['uniform']['quality']:.4f} "
          f"({len(h['trials'])} trials, {h['seconds']['total']:.1f} s)")
    for group in h["groups"]:
        print(f"  {group['name']}: {h['allocation'][group['layers'][0]]:.4f}")
    print(f"wrote {args.out}")
    return 0


def _check_file_out(path: str, flag: str, overwrite: bool) -> str:
    from ..cli import CLIError

    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a directory; expected a file name")
    if os.path.exists(path) and not overwrite:
        raise CLIError(f"{flag} {path!r} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {path!r}: {parent!r} is not a writable directory")
    return path
