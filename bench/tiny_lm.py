"""A small causal LM trained here, on CPU, on real English text, for bench_quality.py's perplexity rows.

Text: the English prose that ships with every CPython: the language reference / library topics of
`pydoc_data.topics` (what `help("...")` prints) and the docstrings of the standard library's modules,
classes and functions (read with `ast`, never imported), until about `--chars` characters. Documents are
shuffled with a fixed seed and split 90/10 into train / held-out text, so the held-out perplexity is on
documents the model never saw.

Tokenizer: a byte-level BPE (the `tokenizers` library, vocabulary 2048) trained on the train split.
Model: a transformers Llama (4 blocks, hidden 128, MLP 512, 4 heads / 2 KV heads, vocabulary 2048,
1.5M parameters), AdamW with a cosine schedule, fixed seed, `--steps` steps of 8 x 128 tokens (about one
pass over the train text). The first use trains it (904 s measured on the shared, heavily loaded 2-core
machine; less on an idle one) and caches model, tokenizer and token ids under bench/results/tiny_lm/
(git-ignored); later uses load the cache.

    python bench/tiny_lm.py [--steps 500] [--out bench/results/tiny_lm]   # train (or report the cache)
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

DEFAULT_DIR = Path(__file__).resolve().parent / "results" / "tiny_lm"
SEQ_LEN = 128
VOCAB = 2048


def documents(max_chars: int = 1_600_000) -> list[str]:
    """Real English documents from the running Python: pydoc topics, then stdlib docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) > 200]
    total = sum(map(len, docs))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if total >= max_chars or "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc.strip())
        if parts:
            doc = "\n\n".join(parts)
            docs.append(doc)
            total += len(doc)
    return docs


def split(docs: list[str], seed: int = 0, held_out: float = 0.1) -> tuple[str, str]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(len(docs) * held_out))
    test = [docs[i] for i in sorted(order[:n_test])]
    train = [docs[i] for i in sorted(order[n_test:])]
    return "\n\n".join(train), "\n\n".join(test)


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)], trainer)
    return tok


def make_model(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(config)


def train(out: Path = DEFAULT_DIR, steps: int = 500, batch: int = 8, lr: float = 3e-3, seed: int = 0,
          log=print) -> None:
    began = time.perf_counter()
    train_text, test_text = split(documents(), seed)
    tok = train_tokenizer(train_text)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    test_ids = torch.tensor(tok.encode(test_text).ids, dtype=torch.long)
    log(f"text: {len(train_text)} train / {len(test_text)} held-out characters, {train_ids.numel()} / "
        f"{test_ids.numel()} tokens (tokenizer {time.perf_counter() - began:.0f} s)")
    model = make_model(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        starts = torch.randint(0, train_ids.numel() - SEQ_LEN - 1, (batch,), generator=g)
        x = torch.stack([train_ids[s:s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tok.save(str(out / "tokenizer.json"))
    torch.save({"train": train_ids, "test": test_ids}, out / "tokens.pt")
    (out / "info.json").write_text(json.dumps({"steps": steps, "batch": batch, "seq_len": SEQ_LEN, "lr": lr,
                                               "seed": seed, "seconds": time.perf_counter() - began,
                                               "python": sys.version.split()[0]}, indent=2))
    log(f"trained in {time.perf_counter() - began:.0f} s -> {out}")


def load(out: Path = DEFAULT_DIR, steps: int = 500, log=print):
    """(model, train token ids, held-out token ids), training first when there is no cache."""
    import transformers as tf

    if not (out / "info.json").exists():
        train(out, steps=steps, log=log)
    ids = torch.load(out / "tokens.pt")
    model = tf.LlamaForCausalLM.from_pretrained(out / "model").eval()
    return model, ids["train"], ids["test"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if (out / "info.json").exists():
        print(f"cached: {out} ({(out / 'info.json').read_text()})")
        return
    train(out, steps=args.steps)


if __name__ == "__main__":
    main()
