"""End-to-end decode: tokens/s of a LLaMA-7B-shaped model, dense vs 2:4 SparseLinear, batch 1, greedy.

A random LLaMA-7B-shaped model (transformers LlamaConfig, bf16, built on the GPU; `--layers` shrinks it)
has every decoder-block nn.Linear magnitude-pruned to 2:4 in place (no calibration). `dense` decodes with
those pruned weights as plain nn.Linear; `prunekit` decodes after `prunekit.sparsify(model)` swapped them
for SparseLinear, so both compute the same function and should generate the same tokens.

Each decode step feeds one token through a transformers StaticCache with an explicit 4D mask and position
built from on-device tensors, and writes the argmax back as the next input: no host sync, so one step can
be captured in a CUDA graph (mode `graph`) or run as is (mode `eager`, launch-bound). After a prompt of
`--prompt` tokens, `--new-tokens` steps are timed between CUDA events (the second of two passes; the first
warms up): per-token latency median / p10 / p90, tokens/s (1000 / median ms) and `vs_dense`.

    python bench/bench_decode.py [--layers 32] [--prompt 32] [--new-tokens 128] [--modes graph eager]

Writes DIR/bench_decode.json and .md (bench/common.py; M is the batch, gbps counts the weight bytes read
per token, embedding table excluded). Extras: `agree` = share of the generated tokens, from the first on,
equal to those of the first row (dense, first mode); `logit_err` = relative error of the prompt's last logits vs dense.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_model import LLAMA7B, build_model  # noqa: E402

PROVIDERS = ["dense", "prunekit"]
MODES = ["graph", "eager"]
BLOCKS = "model.layers.*"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 = LLaMA-7B; fewer for quick runs)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=128, help="timed decode steps")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    p.add_argument("--hidden-size", type=int, default=LLAMA7B["hidden_size"])
    p.add_argument("--intermediate-size", type=int, default=LLAMA7B["intermediate_size"])
    p.add_argument("--heads", type=int, default=LLAMA7B["num_attention_heads"])
    p.add_argument("--vocab-size", type=int, default=LLAMA7B["vocab_size"])
    common.add_out_arg(p)
    return p.parse_args(argv)


def model_sizes(args) -> dict:
    return {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
            "num_attention_heads": args.heads, "num_key_value_heads": args.heads, "vocab_size": args.vocab_size}


def shape_name(args) -> str:
    sizes = model_sizes(args)
    if all(LLAMA7B[k] == v for k, v in sizes.items()):
        return f"llama7b:{args.layers}L"
    return f"h{args.hidden_size}-i{args.intermediate_size}-v{args.vocab_size}:{args.layers}L"


@torch.no_grad()
def prune_blocks_24(model: nn.Module) -> int:
    """Magnitude 2:4 on every nn.Linear inside the decoder blocks, in place; returns how many."""
    import prunekit

    linears = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        keep = prunekit.magnitude_mask(linear.weight, "2:4", name=name)
        linear.weight.masked_fill_(~keep, 0)
    return len(linears)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers one decode step reads (the embedding table only gives one row)."""
    skip = {id(t) for t in model.get_input_embeddings().parameters()}
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in skip)


class Decoder:
    """Greedy batch-1 decoding with a static KV cache; `step` keeps all its state on the device."""

    def __init__(self, model, prompt: torch.Tensor, new_tokens: int):
        from transformers import StaticCache

        self.model, self.prompt = model, prompt
        device, length = prompt.device, prompt.shape[1] + new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.key_positions = torch.arange(length, device=device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # of the token fed next
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(length + 1, dtype=torch.long, device=device)  # indexed by position

    @torch.no_grad()
    def restart(self) -> torch.Tensor:
        """Empty the cache, prefill the prompt, set the first generated token; returns the last logits."""
        self.cache.reset()  # zeroes in place: tensors captured in a graph stay valid
        logits = self.model(input_ids=self.prompt, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        self.tokens.zero_()
        self.position.fill_(self.prompt.shape[1])
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.tokens.index_copy_(0, self.position.view(1), self.token.view(1))
        return logits.float()

    @torch.no_grad()
    def step(self) -> None:
        mask = (self.key_positions <= self.position).view(1, 1, 1, -1)  # 4D: transformers uses it as is
        logits = self.model(input_ids=self.token, position_ids=self.position, attention_mask=mask,
                            past_key_values=self.cache, use_cache=True).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)
        self.tokens.index_copy_(0, self.position.view(1), self.token.view(1))

    def generated(self) -> list[int]:
        return self.tokens[self.prompt.shape[1]:].tolist()


def decode_ms(decoder: Decoder, new_tokens: int, graph: bool) -> list[float]:
    """Per-token milliseconds of the second of two decode passes, CUDA events between the steps."""
    run = common._capture([decoder.step]).replay if graph else decoder.step
    for _ in range(2):  # the first pass warms up (allocator, kernel selection, clocks)
        decoder.restart()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens + 1)]
        events[0].record()
        for event in events[1:]:
            run()
            event.record()
        events[-1].synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def agreement(tokens: list[int], reference: list[int]) -> float:
    """Share of tokens equal to the reference up to the first difference (greedy decoding diverges after it)."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return same / max(len(reference), 1)


def bench_provider(run: dict, provider: str, model, prompt, args, dtype, reference: dict) -> list[dict]:
    decoder = Decoder(model, prompt, args.new_tokens)
    logits = decoder.restart()
    reference.setdefault("logits", logits)
    logit_err = float((logits - reference["logits"]).norm() / reference["logits"].norm())
    nbytes = weight_bytes(model)
    rows = []
    for mode in args.modes:
        samples = decode_ms(decoder, args.new_tokens, graph=(mode == "graph"))
        tokens = decoder.generated()
        reference.setdefault("tokens", tokens)
        timing = common.summarize(samples, "ms")
        rows.append(common.row(run, "decode", provider, shape=shape_name(args), dtype=dtype, M=1, mode=mode,
                               timing=timing, bytes_moved=nbytes, tokens_per_s=1000.0 / timing["time_ms"],
                               mean_tokens_per_s=1000.0 * len(samples) / sum(samples), prompt=args.prompt,
                               new_tokens=args.new_tokens, weight_gib=nbytes / 2**30,
                               agree=agreement(tokens, reference["tokens"]), logit_err=logit_err))
    del decoder
    return rows


def add_vs_dense(rows: list[dict]) -> None:
    """extras.vs_dense = dense median per-token time / this one, per mode."""
    dense = {r["mode"]: r["time_ms"] for r in rows if r["provider"] == "dense"}
    for r in rows:
        if r["mode"] in dense:
            r["extras"]["vs_dense"] = round(dense[r["mode"]] / r["time_ms"], 3)


def sparsify_blocks(model, expected: int) -> int:
    import prunekit

    report = prunekit.sparsify(model, include=BLOCKS)
    if len(report.swapped) != expected:
        raise RuntimeError(f"bench_decode: block layers not swapped to SparseLinear:\n{report}")
    return len(report.swapped)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.require_cuda("bench_decode")
    dtype = torch.bfloat16
    built = {}
    build = common.wall_time_ms(lambda: built.setdefault(
        "model", build_model(args.layers, args.prompt + args.new_tokens, device, **model_sizes(args))))
    model = built["model"]
    pruned = common.wall_time_ms(lambda: built.setdefault("pruned", prune_blocks_24(model)))
    run = common.run_info("bench_decode", device, argv, build_s=build["time_ms"] / 1e3,
                          prune_s=pruned["time_ms"] / 1e3, pruned_layers=built["pruned"],
                          target="prunekit tokens/s above dense; weight bytes bound it near 1.75x at 7B")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt), generator=g).to(device)
    rows: list[dict] = []
    reference: dict = {}
    for provider in (p for p in PROVIDERS if p in args.providers):
        if provider == "prunekit":
            swap = common.wall_time_ms(lambda: built.setdefault("swapped", sparsify_blocks(model, built["pruned"])))
            run.update(sparsify_s=swap["time_ms"] / 1e3, swapped_layers=built["swapped"])
        rows += bench_provider(run, provider, model, prompt, args, dtype, reference)
        add_vs_dense(rows)
        common.write_results(args.out, "bench_decode", run, rows)  # keep what is done if a later case fails
    print(common.results_table.render(run, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
