"""CPU benchmark of the sparse linear layers (issue 10): providers side by side in one run, medians of
interleaved repeats (provider A, B, C, A, B, C, ...), so that the noise of a shared machine hits all alike.

Layer rows (op "linear_cpu"): dense F.linear, dense nn.Linear (the module a sparse layer replaces: F.linear
plus the nn.Module call, ~2 us), torch CSR (torch.sparse.mm on the 2:4 weight), prunekit 2:4 (the C++
kernel), prunekit 2:4 layer (SparseLinear with its kernel-vs-dense route), prunekit unstructured (bitmask
kernel) at 70/80/90% and its routed layer at 80%. For M <= 4 every provider cycles through enough
copies of its weight to exceed 2x the L3 (decode reads weights from memory, not cache). `vs_dense` = dense
time / provider time (same run); the routed layers also get `vs_dense_layer` (nn.Linear time / layer time).
End to end (op "decode_cpu", "minilm_cpu"): greedy decode tokens/s of a
Llama-shaped model with random weights (dense vs 2:4 vs 80% unstructured, same pruned weights, tokens
compared) and all-MiniLM-L6-v2 sentences/s (dense vs 2:4 with the default form bucket M = 1 vs 2:4 sparsified with
serve_m = the batch's tokens; embeddings compared with the pruned dense model).

    python bench/bench_cpu.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.nn.sparse_linear import SparseLinear  # noqa: E402
from prunekit.nn.unstructured_linear import UnstructuredSparseLinear  # noqa: E402
from prunekit.ops import sparse24_dense, sparse_cpu, sparse_cpu_route  # noqa: E402
from prunekit.ref import bitmask, selection  # noqa: E402

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "384x384", "1536x384", "384x1536"]  # out x in
MS = [1, 4, 16, 64, 256]
UNSTRUCTURED = [0.7, 0.8, 0.9]
L3_BYTES = 32 * 2**20
CLOCK = [time.perf_counter]  # --cpu-time: time.thread_time


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in have]
    except OSError:
        pass
    return []


def prune_24(W: torch.Tensor) -> torch.Tensor:
    return W * selection.nm_keep_mask(W.abs().float(), 2, 4).to(W.dtype)


def prune_rows(W: torch.Tensor, sparsity: float) -> torch.Tensor:
    return W * selection.row_keep_mask(W.abs().float(), sparsity).to(W.dtype)


def interleaved(fns: dict, reps: int, min_s: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each fn, `reps` rounds (or more until min_s), each round every fn once in turn."""
    return sparse_cpu_route.interleaved_samples(fns, reps, None, min_s, CLOCK[0])


def timing(samples: list[float], per: int = 1) -> dict:
    return common.summarize([s / per * 1e6 for s in samples], "us")


# ---- layer benchmark ---------------------------------------------------------------------------------

class Case:
    """The weights of one (shape, dtype): dense, 2:4 and unstructured variants, with copies for rotation."""

    def __init__(self, n: int, k: int, dtype, copies: int, seed: int, torch_csr: bool):
        gen = torch.Generator().manual_seed(seed)
        self.n, self.k, self.dtype = n, k, dtype
        base = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(copies)]
        self.dense = base
        self.w24 = [prune_24(W) for W in base]
        self.p24 = [torch.ops.prunekit.pack24(W) for W in self.w24]
        self.csr = []
        if torch_csr:
            try:
                self.csr = [W.to_sparse_csr() for W in self.w24]
                torch.sparse.mm(self.csr[0], torch.zeros(k, 1, dtype=dtype))
            except RuntimeError as exc:
                self.csr, self.csr_error = [], str(exc).splitlines()[0]
        self.wu = {s: [prune_rows(W, s) for W in base] for s in UNSTRUCTURED}
        self.pu = {s: [(v, m, bitmask.row_offsets(m)) for v, m in (bitmask.pack(W) for W in ws)]
                   for s, ws in self.wu.items()}
        self.linear = [self._linear(W) for W in base]  # the nn.Linear a sparse layer replaces (same tensors)
        self.layer24 = [SparseLinear.from_packed(v, m) for v, m in self.p24]
        self.layeru = [UnstructuredSparseLinear.from_dense(self._linear(W)) for W in self.wu[0.8]]

    def _linear(self, W):
        lin = nn.Linear(self.k, self.n, bias=False, dtype=self.dtype)
        lin.weight.data = W
        return lin.requires_grad_(False)

    def providers(self, x) -> dict:
        def each(fn, items):
            return lambda: [fn(item) for item in items]
        p = {"dense": each(lambda W: F.linear(x, W), self.dense),
             "dense_layer": each(lambda lin: lin(x), self.linear)}
        if self.csr:
            xt = x.t().contiguous()
            p["torch_csr"] = each(lambda W: torch.sparse.mm(W, xt), self.csr)
        p["prunekit_24"] = each(lambda vm: sparse_cpu.s24_linear(x, *vm), self.p24)
        p["prunekit_24_layer"] = each(lambda layer: layer(x), self.layer24)
        for s in UNSTRUCTURED:
            p[f"prunekit_u{int(s * 100)}"] = each(lambda vmr: sparse_cpu.bitmask_linear(x, *vmr), self.pu[s])
        p["prunekit_u80_layer"] = each(lambda layer: layer(x), self.layeru)
        return p

    def check(self, x) -> dict:
        """Relative error of each kernel against the fp32 reference on its own pruned weight."""
        def err(y, W):
            ref = F.linear(x.float(), W.float())
            return float((y.float() - ref).norm() / ref.norm())
        out = {"prunekit_24": err(sparse_cpu.s24_linear(x, *self.p24[0]), self.w24[0])}
        for s in UNSTRUCTURED:
            out[f"prunekit_u{int(s * 100)}"] = err(sparse_cpu.bitmask_linear(x, *self.pu[s][0]), self.wu[s][0])
        return out

    def bytes_of(self, name: str) -> float:
        el = torch.empty(0, dtype=self.dtype).element_size()
        if name in ("dense", "dense_layer"):
            return self.n * self.k * el
        if name.startswith("prunekit_24"):
            v, m = self.p24[0]
            return v.numel() * el + m.numel()
        if name.startswith("prunekit_u"):
            s = 0.8 if name.endswith("layer") else int(name[10:12]) / 100
            v, m, _ = self.pu[s][0]
            return v.numel() * el + m.numel()
        if name == "torch_csr":
            W = self.csr[0]
            return W.values().numel() * el + W.col_indices().numel() * 8
        return float("nan")


def bench_layers(run: dict, args, rows: list[dict], out: Path) -> None:
    threads_list = [torch.get_num_threads(), 1] if not args.one_thread_only else [1]
    threads_list = list(dict.fromkeys(threads_list))
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        for dtype in args.dtypes:
            dense_bytes = n * k * torch.empty(0, dtype=dtype).element_size()
            rotate = max(1, min(args.max_copies, math.ceil(2 * L3_BYTES / dense_bytes)))
            decode = Case(n, k, dtype, rotate, seed=n + k, torch_csr=not args.no_csr) if min(args.ms) <= 4 else None
            single = None
            if max(args.ms) > 4:
                single = decode if decode is not None and rotate == 1 else Case(n, k, dtype, 1, seed=n + k,
                                                                                 torch_csr=not args.no_csr)
            for threads in threads_list:
                torch.set_num_threads(threads)
                for M in args.ms:
                    case = decode if M <= 4 else single
                    x = torch.randn(M, k, generator=torch.Generator().manual_seed(M)).to(dtype)
                    errs = case.check(x)
                    copies = len(case.dense)
                    samples = interleaved(case.providers(x), args.reps, args.min_s)
                    dense_t = statistics.median(samples["dense"]) / copies
                    linear_t = statistics.median(samples["dense_layer"]) / copies
                    for name, s in samples.items():
                        t = timing(s, copies)
                        extras = {"threads": threads, "copies": copies, "vs_dense": dense_t / (t["time_us"] * 1e-6),
                                  "weight_bytes_vs_dense": case.bytes_of(name) / dense_bytes}
                        if name in errs:
                            extras["rel_err"] = errs[name]
                        if name.endswith("_layer") and name != "dense_layer":
                            extras["vs_dense_layer"] = linear_t / (t["time_us"] * 1e-6)
                            layer = (case.layer24 if "24" in name else case.layeru)[0]
                            key = sparse_cpu_route.key("2:4" if "24" in name else "bitmask", n, k, dtype, False, M)
                            extras["route"] = ("dense layer" if layer.is_dense else "packed" if
                                               sparse_cpu_route.chosen_routes().get(key) != "dense" else
                                               "packed (kernel or unpack+dense at this M)")
                        rows.append(common.row(run, "linear_cpu", name, shape=shape, dtype=dtype, M=M, timing=t,
                                               flops=2.0 * M * n * k, **extras))
                    common.write_results(out, "bench_cpu", run, rows)
                    summary = "  ".join(f"{r['provider']} {r['extras']['vs_dense']:.2f}x" for r in rows[-len(samples):])
                    print(f"{shape} {str(dtype)[6:]} M={M} t={threads}: dense {dense_t * 1e6:.0f} us | {summary}",
                          flush=True)
            torch.set_num_threads(threads_list[0])
            del decode, single


# ---- end to end --------------------------------------------------------------------------------------

def llama(args, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875) // 64 * 64,
                      num_hidden_layers=args.blocks, num_attention_heads=args.hidden // 128,
                      num_key_value_heads=args.hidden // 128, vocab_size=args.vocab, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def prune_blocks(model, fn) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.copy_(fn(module.weight))


def weight_bytes(model) -> int:
    """Bytes of the block linears' weights as held (packed, or dense where the route chose dense)."""
    total = 0
    for name, module in model.named_modules():
        if name == "lm_head":
            continue
        if isinstance(module, (SparseLinear, UnstructuredSparseLinear)):
            held = [module._dense_weight] if module.is_dense else [module.values, getattr(module, "meta", None),
                                                                    getattr(module, "mask", None)]
            if isinstance(module, SparseLinear) and not module.is_dense:  # the op's cached dense route
                held.append(sparse24_dense._unpacked.lookup(module.values, module.meta))
            total += sum(t.numel() * t.element_size() for t in held if t is not None)
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def bench_decode(run: dict, args, rows: list[dict], out: Path) -> None:
    for dtype in args.dtypes:
        base = llama(args, dtype)
        prompt = torch.randint(0, args.vocab, (1, 8), generator=torch.Generator().manual_seed(0))
        models = {}
        for label, fn in (("dense", None), ("prunekit_24", prune_24), ("prunekit_u80", lambda W: prune_rows(W, 0.8))):
            m = copy.deepcopy(base)
            if fn is not None:
                prune_blocks(m, fn)
                ref = copy.deepcopy(m)  # the pruned model, dense: what the sparse one must reproduce
                pk.sparsify(m, exclude="lm_head", unstructured=label == "prunekit_u80", min_sparsity=0.7)
            else:
                ref = m
            models[label] = (m, ref)

        def generate(m):
            with torch.inference_mode():
                return m.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens,
                                  pad_token_id=0)

        outputs = {label: generate(m) for label, (m, _) in models.items()}  # warm-up: routes measured here
        samples = interleaved({label: (lambda m=m: generate(m)) for label, (m, _) in models.items()}, args.e2e_reps)
        dense_s = statistics.median(samples["dense"])
        dense_bytes = weight_bytes(models["dense"][0])
        for label, (m, ref) in models.items():
            t = common.summarize([s * 1e3 for s in samples[label]], "ms")
            agree = float((outputs[label] == generate(ref)).float().mean())
            with torch.inference_mode():
                logits, ref_logits = m(prompt).logits.float(), ref(prompt).logits.float()
                # the pruned dense model's own error in this dtype (vs itself in fp32): the tolerance to compare
                # logit_rel_err with (greedy tokens of a random-weight model sit near ties: in bf16 they drift)
                ref32 = copy.deepcopy(ref).float() if dtype != torch.float32 else ref
                own = ref32(prompt).logits.float()
                del ref32
            rows.append(common.row(run, "decode_cpu", label, shape=f"llama h{args.hidden} x{args.blocks}", dtype=dtype,
                                   M=1, timing=t, tokens_per_s=args.new_tokens / (t["time_ms"] * 1e-3),
                                   vs_dense=dense_s / (t["time_ms"] * 1e-3), token_agree=agree,
                                   logit_rel_err=float((logits - ref_logits).norm() / ref_logits.norm()),
                                   dense_dtype_logit_rel_err=float((ref_logits - own).norm() / own.norm()),
                                   weight_bytes_vs_dense=weight_bytes(m) / dense_bytes,
                                   dense_layers=sum(1 for mod in m.modules() if getattr(mod, "is_dense", False)),
                                   threads=torch.get_num_threads()))
            print(f"decode {str(dtype)[6:]} {label}: {rows[-1]['extras']['tokens_per_s']:.2f} tok/s "
                  f"({rows[-1]['extras']['vs_dense']:.2f}x), weights {rows[-1]['extras']['weight_bytes_vs_dense']:.3f}x, "
                  f"agree {agree:.3f}, logit err {rows[-1]['extras']['logit_rel_err']:.2e} (dense {str(dtype)[6:]} "
                  f"own {rows[-1]['extras']['dense_dtype_logit_rel_err']:.2e})", flush=True)
        common.write_results(out, "bench_cpu", run, rows)


def bench_minilm(run: dict, args, rows: list[dict], out: Path) -> None:
    from prunekit.demo import english_sentences, load_minilm

    dense, tok = load_minilm()
    sentences = english_sentences()[:args.sentences]
    batch = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    pruned = copy.deepcopy(dense)
    prune_blocks(pruned, prune_24)
    sparse = copy.deepcopy(pruned)
    pk.sparsify(sparse, include="*encoder*")
    tokens = int(batch["attention_mask"].numel())
    served = copy.deepcopy(pruned)  # the form follows this batch's M, not the decode bucket (M = 1)
    pk.sparsify(served, include="*encoder*", serve_m=tokens)

    def embed(m):
        with torch.inference_mode():
            h = m(**batch).last_hidden_state
            w = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            return F.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    e_pruned, models = embed(pruned), {"prunekit_24": sparse, "prunekit_24_serve_m": served}
    outputs = {label: embed(m) for label, m in models.items()}
    fns = {"dense": lambda: embed(dense), **{label: (lambda m=m: embed(m)) for label, m in models.items()}}
    samples = interleaved(fns, args.e2e_reps)
    dense_s = statistics.median(samples["dense"])
    for label, s in samples.items():
        t = common.summarize([v * 1e3 for v in s], "ms")
        extras = {"sentences_per_s": len(sentences) / (t["time_ms"] * 1e-3), "vs_dense": dense_s / (t["time_ms"] * 1e-3),
                  "tokens": tokens, "threads": torch.get_num_threads()}
        if label in models:
            extras["cos_vs_pruned_dense"] = float((outputs[label] * e_pruned).sum(-1).min())
            extras["dense_layers"] = sum(1 for mod in models[label].modules() if getattr(mod, "is_dense", False))
            extras["sparse_layers"] = sum(1 for mod in models[label].modules() if isinstance(mod, SparseLinear))
        rows.append(common.row(run, "minilm_cpu", label, shape=f"{len(sentences)} sentences", dtype=torch.float32,
                               timing=t, **extras))
        print(f"minilm {label}: {extras['sentences_per_s']:.1f} sentences/s ({extras['vs_dense']:.2f}x)", flush=True)
    common.write_results(out, "bench_cpu", run, rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 4096x4096, 11008x4096 and 384x1536, M 1/16/64, fewer repeats, smaller e2e")
    p.add_argument("--shapes", nargs="+", default=None)
    p.add_argument("--M", nargs="+", type=int, default=None, dest="ms")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--min-s", type=float, default=0.0, help="keep repeating each case for at least this long")
    p.add_argument("--max-copies", type=int, default=64)
    p.add_argument("--one-thread-only", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with this thread's CPU time instead of wall time (one-thread runs on a shared machine)")
    p.add_argument("--no-csr", action="store_true")
    p.add_argument("--parts", nargs="+", choices=["layers", "decode", "minilm"], default=["layers", "decode", "minilm"])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--e2e-reps", type=int, default=None)
    p.add_argument("--sentences", type=int, default=64)
    common.add_out_arg(p)
    args = p.parse_args(argv)
    q = args.quick
    args.shapes = args.shapes or (["4096x4096", "11008x4096", "384x1536"] if q else SHAPES)
    args.ms = args.ms or ([1, 16, 64] if q else MS)
    args.reps = args.reps or (3 if q else 5)
    args.new_tokens = args.new_tokens or (8 if q else 32)
    args.e2e_reps = args.e2e_reps or (2 if q else 3)
    if q:
        args.blocks = min(args.blocks, 4)
        args.max_copies = min(args.max_copies, 8)
    args.dtypes = [getattr(torch, d) for d in args.dtypes]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1:
            print("bench_cpu: --cpu-time counts the calling thread only: use it with --threads 1", file=sys.stderr)
            return 2
        CLOCK[0] = time.thread_time
    if not sparse_cpu.available():
        print("bench_cpu: prunekit._C has no sparse_linear_cpu (rebuild prunekit)", file=sys.stderr)
        return 1
    run = common.run_info("bench_cpu", "cpu", argv, cpu=common.cpu_name(), cpu_flags=cpu_flags(),
                          isa=sparse_cpu.best_isa(), threads=torch.get_num_threads(),
                          load_avg=os.getloadavg()[0], clock="thread CPU time" if args.cpu_time else "wall",
                          note="ratios are same-run medians of interleaved rounds")
    rows: list[dict] = []
    out = Path(args.out)
    print(f"{run['cpu']} ({', '.join(run['cpu_flags'])}), {run['threads']} threads, ISA {run['isa']}, "
          f"load {run['load_avg']:.1f}, commit {run['commit']}", flush=True)
    if "layers" in args.parts:
        bench_layers(run, args, rows, out)
    if "decode" in args.parts:
        bench_decode(run, args, rows, out)
    if "minilm" in args.parts:
        bench_minilm(run, args, rows, out)
    run["routes"] = {str(k): v for k, v in sparse_cpu_route.chosen_routes().items()}
    path = common.write_results(out, "bench_cpu", run, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
