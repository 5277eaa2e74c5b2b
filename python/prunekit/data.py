"""Calibration and evaluation data: token windows from texts, files or token tensors, and checks.

As in the references, calibration samples are `n_samples` windows of `seq_len` consecutive tokens
taken at seeded random offsets of the tokenized text.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping

import torch

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ------------------------------------------------------------------------------------ sources
def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content exactly as given (no stripping, blank lines kept): what perplexity
    and calibration read, so a number measured here matches one measured on the raw file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {os.fspath(path)!r} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file {os.fspath(path)!r} has no text")
    return text


def read_texts(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped: one sentence each (sentence embeddings)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {os.fspath(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"text file {os.fspath(path)!r} has no text")
    return texts


def tokenize(tokenizer, texts: str | Iterable[str]) -> torch.Tensor:
    """All texts joined by blank lines, as one 1-D tensor of token ids (no special tokens)."""
    text = texts if isinstance(texts, str) else "\n\n".join(texts)
    if not text.strip():
        raise ValueError("tokenize: got no text")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(token_ids: torch.Tensor, n_samples: int = 128, seq_len: int = 2048, seed: int = 0,
            *, wrap=None) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random offsets: a [n_samples, seq_len] tensor.

    `wrap`, if given, turns a window's ids into the model's input (e.g. adding [CLS]/[SEP]); it must
    add the same number of tokens to every window, and the window is shortened to leave room.
    """
    ids = _check_token_ids(token_ids, "token_ids").reshape(-1)
    if not (isinstance(n_samples, int) and n_samples > 0):
        raise ValueError(f"n_samples: expected a positive integer, got {n_samples!r}")
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ValueError(f"seq_len: expected a positive integer, got {seq_len!r}")
    extra = len(wrap([])) if wrap is not None else 0
    body = seq_len - extra
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after {extra} special tokens")
    if ids.numel() < body:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {body}; "
                         "give more text or a smaller seq_len")
    if ids.numel() < n_samples * body:
        warnings.warn(f"the text has {ids.numel()} tokens, fewer than n_samples x seq_len = {n_samples} x "
                      f"{body} = {n_samples * body}: the calibration windows overlap (the same text is used "
                      f"several times); give more text for {n_samples} distinct windows", stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body + 1, (n_samples,), generator=gen).tolist()
    rows = [ids[s:s + body] for s in starts]
    if wrap is not None:
        rows = [torch.tensor(wrap(r.tolist()), dtype=torch.long) for r in rows]
    return torch.stack(rows)


def calibration_batches(tokenizer, texts: str | Iterable[str], n_samples: int = 128,
                        seq_len: int = 2048, seed: int = 0, *, special_tokens: bool = False
                        ) -> torch.Tensor:
    """Calibration samples from raw texts: a [n_samples, seq_len] LongTensor.

    `special_tokens=True` frames each window the way the tokenizer frames a sequence (e.g.
    [CLS] ... [SEP] for BERT-style encoders).
    """
    wrap = _special_token_framer(tokenizer) if special_tokens else None
    return windows(tokenize(tokenizer, texts), n_samples, seq_len, seed, wrap=wrap)


def _special_token_framer(tokenizer):
    """A function adding the tokens the tokenizer puts before and after a sequence, found by
    encoding a probe word with and without them (works for fast and slow tokenizers)."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    framed = tokenizer("hello", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(framed) - len(bare) + 1) if framed[i:i + len(bare)] == bare), None)
    if at is None:
        raise ValueError(f"special_tokens=True: cannot tell which special tokens "
                         f"{type(tokenizer).__name__} adds around a sequence")
    prefix, suffix = framed[:at], framed[at + len(bare):]
    return lambda ids: [*prefix, *ids, *suffix]


def from_file(tokenizer, path: str | os.PathLike, n_samples: int = 128, seq_len: int = 2048,
              seed: int = 0, *, special_tokens: bool = False) -> torch.Tensor:
    """Calibration samples from a local UTF-8 text file, tokenized as given (see read_text)."""
    return calibration_batches(tokenizer, read_text(path), n_samples, seq_len, seed,
                               special_tokens=special_tokens)


def encode_sentences(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128
                     ) -> list[dict[str, torch.Tensor]]:
    """Padded batches of whole sentences (input_ids, attention_mask), for sentence embeddings."""
    if not sentences:
        raise ValueError("encode_sentences: got no sentences")
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(sentences), batch_size)]


# -------------------------------------------------------------------------------------- checks
def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings support, if its config says."""
    config = getattr(model, "config", model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def _check_token_ids(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: expected integer token ids (torch.long), got {t.dtype}; "
                        "tokenize the text first (prunekit.data.calibration_batches)")
    if t.numel() == 0:
        raise ValueError(f"{name}: is empty")
    return t


def _check_batch(batch: dict, name: str, max_len: int | None, vocab: int | None) -> dict:
    """Checks token ids when the batch has them; other model inputs (a custom module's float
    features, say) pass through as given."""
    if "input_ids" not in batch:
        return batch
    ids = _check_token_ids(batch["input_ids"], f"{name}.input_ids")
    if ids.dim() != 2:
        raise ValueError(f"{name}.input_ids: expected shape [batch, seq_len], got {tuple(ids.shape)}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{name}: seq_len {ids.shape[1]} is longer than the model supports "
                         f"({max_len} positions); use a shorter seq_len")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"{name}.input_ids: token ids must lie in [0, {vocab}), got [{low}, {high}]; "
                         "was the data tokenized with this model's tokenizer?")
    mask = batch.get("attention_mask")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name}.attention_mask: expected shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
    return {**batch, "input_ids": ids.long()}


def as_batches(calibration, *, batch_size: int = 1, max_len: int | None = None,
               vocab: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Normalizes calibration data into a list of model-input dicts, checking shapes and dtypes.

    Accepts a [n_samples, seq_len] tensor of token ids (split into batches of `batch_size` rows),
    one dict of model inputs, or an iterable of [batch, seq_len] / [seq_len] tensors or dicts
    (keyword arguments of the model's forward; `input_ids`, when present, is checked).
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if isinstance(calibration, torch.Tensor):
        ids = _check_token_ids(calibration, "calibration")
        if ids.dim() != 2:
            raise ValueError(f"calibration: expected token ids of shape [n_samples, seq_len], "
                             f"got {tuple(ids.shape)}")
        items = [{"input_ids": chunk} for chunk in ids.split(batch_size)]
    elif isinstance(calibration, Mapping):
        items = [dict(calibration)]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = []
        for item in calibration:
            if isinstance(item, torch.Tensor):
                items.append({"input_ids": item.unsqueeze(0) if item.dim() == 1 else item})
            elif isinstance(item, Mapping):
                items.append(dict(item))
            else:
                raise TypeError(f"calibration[{len(items)}]: expected a tensor of token ids or a dict "
                                f"of model inputs, got {type(item).__name__}")
    else:
        raise TypeError(f"calibration: expected token ids (a [n_samples, seq_len] tensor) or a list of "
                        f"batches, got {type(calibration).__name__}")
    if not items:
        raise ValueError("calibration: got no batches")
    return [_check_batch(b, f"calibration[{i}]", max_len, vocab) for i, b in enumerate(items)]
