"""Decode kernel v2 for 2:4 weights (csrc/cuda/sparse24_decode_v2.cu; M = 1..64 tokens, bf16/fp16, sm_80+).

The kernel reads its own device layout (ref/sparse24_decode_v2.py), built once per weight from the logical
format on the weight's device and cached next to it (ops/_weight_cache.py, like the sm90 copy), together
with the weight's lock buffer for the in-kernel reduction (int32, zero; every launch leaves it zero). One
weight's launches must not run at the same time on two streams (they would share the locks); CUDA graph
replays and ordinary inference never do.

Configurations: a compiled variant (warps, pipeline stages, K chunks per stage; `variants()`) and the grid,
given as blocks per SM (the kernel deals K over that many blocks, "stream-K"); `configs()` lists the
(variant, blocks per SM) pairs, `name(config)` their route names (bench_linear reports one row each).
`tuned_linear` (the dispatcher's entry) autotunes once per (device, N, K, dtype, bias, M bucket): every config
is checked against the dense product (one that raises or disagrees is left out and logged) and the rest are
timed under CUDA graphs on cold weights; `PRUNEKIT_DECODE_V2=<variant>:<blocks per SM>` pins one instead.

`prunekit::sparse24_decode_v2(x, weight, locks, bias, N, variant, blocks_per_sm)` is the torch custom op on a
prepared weight (FakeTensor/torch.compile-ready through register_fake; on CPU it runs the reference on the
restored logical weight). `linear` is the lean eager path the dispatcher calls (no re-validation).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _native
from ..ref import sparse24_decode_v2 as ref
from . import _dispatch, _timing, _weight_cache, sparse24_dense

log = logging.getLogger("prunekit")

ENV = "PRUNEKIT_DECODE_V2"
TOLERANCE = 2e-2  # per output feature, relative to |y| + |x|·|w| (the dispatcher's gate)
_BF16_FP16 = (torch.bfloat16, torch.float16)
BLOCKS_PER_SM = (1, 2)
DEFAULT = (2, 1)  # (variant, blocks per SM) when nothing was tuned or pinned


@dataclass
class Prepared:
    weight: torch.Tensor  # uint8 [tiles, chunks, 1152]: the v2 device layout
    locks: torch.Tensor   # int32 zeros, one per block tile of the variant with the most


_prepared = _weight_cache.DerivedWeights()
_tuned: dict[tuple, tuple[int, int]] = {}


def clear_cache() -> None:
    _prepared.clear()
    _tuned.clear()


def tuned() -> dict[tuple, tuple[int, int]]:
    """What autotuning picked: {(device, N, K, dtype, bias, M bucket): (variant, blocks per SM)}."""
    return dict(_tuned)


def compiled() -> tuple[bool, str]:
    """(whether this build has the v2 kernel, why not)."""
    mod = _native.cuda_module()
    if mod is None:
        return False, f"prunekit._C_cuda did not load ({_native._errors.get('_C_cuda', 'not loaded')})"
    if not hasattr(mod, "sparse24_decode_v2"):
        return False, "prunekit._C_cuda predates the v2 decode kernel; rebuild"
    return True, ""


@functools.lru_cache(maxsize=1)
def variants() -> tuple[tuple[int, int, int], ...]:
    """(warps, stages, chunks per stage) of every compiled variant, by index."""
    mod = _native.require_cuda_module()
    return tuple(tuple(mod.sparse24_decode_v2_variant(i)) for i in range(mod.sparse24_decode_v2_variant_count()))


def configs() -> list[tuple[int, int]]:
    """Every (variant, blocks per SM) the autotuning times."""
    return [(v, b) for v in range(len(variants())) for b in BLOCKS_PER_SM]


def name(config: tuple[int, int]) -> str:
    """A config's route name, e.g. 'v2_w8s4c1_b1' (usable in PRUNEKIT_SPARSE24_KERNEL)."""
    w, s, c = variants()[config[0]]
    return f"v2_w{w}s{s}c{c}_b{config[1]}"


def pinned() -> tuple[int, int] | None:
    value = os.environ.get(ENV, "")
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) < 1:
        raise ValueError(f"{ENV} must be <variant>:<blocks per SM> (e.g. 2:1), got {value!r}")
    config = (int(parts[0]), int(parts[1]))
    if config[0] >= len(variants()):
        raise ValueError(f"{ENV}: variant {config[0]} does not exist (this build has {len(variants())})")
    return config


def supports(x2d: torch.Tensor, values: torch.Tensor, bucket: int | None = None) -> bool:
    if not compiled()[0] or not x2d.is_cuda or values.dtype not in _BF16_FP16:
        return False
    M, K = x2d.shape
    mod = _native.cuda_module()
    return (1 <= M <= mod.DECODE_V2_MAX_TOKENS and values.shape[0] >= 1 and K >= 8 and K % 8 == 0
            and _dispatch.device_capability(x2d.device) >= (8, 0))


def _build(values: torch.Tensor, meta: torch.Tensor) -> Prepared:
    mod = _native.cuda_module()
    N = values.shape[0]
    count = max(mod.sparse24_decode_v2_lock_count(N, v) for v in range(len(variants()))) if mod else 1
    return Prepared(ref.relayout(values, meta), torch.zeros(count, dtype=torch.int32, device=values.device))


def is_prepared(values: torch.Tensor, meta: torch.Tensor) -> bool:
    return _prepared.lookup(values, meta) is not None


def prepared(values: torch.Tensor, meta: torch.Tensor) -> Prepared:
    """The weight's v2 layout and locks, built on first use (never inside a CUDA graph capture)."""
    if not is_prepared(values, meta) and _weight_cache.capturing(values):
        raise RuntimeError("sparse24_linear (decode v2): the weight's one-time re-layout cannot run inside a "
                           "CUDA graph capture; run one forward before capturing")
    return _prepared.get_or_build(values, meta, _build)


def forget(values: torch.Tensor) -> None:
    """Drops a weight's v2 copy (the dispatcher did not pick v2 for it)."""
    _prepared.forget(values)


def _launch(x2d: torch.Tensor, weight: torch.Tensor, locks: torch.Tensor, bias: torch.Tensor | None, N: int,
            config: tuple[int, int]) -> tuple[torch.Tensor, int]:
    mod = _native.require_cuda_module()
    M, K = x2d.shape
    x2d = x2d.contiguous()
    if x2d.data_ptr() % 16:  # a view into a larger buffer: the kernel copies x in 16-byte pieces
        x2d = x2d.clone()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    y = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    device = x2d.device
    variant, per_sm = config
    # launches go to the current device: make it x's (custom ops get no device guard)
    with torch.cuda.device(device):
        grid = mod.sparse24_decode_v2(x2d.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                      y.data_ptr(), locks.data_ptr(), M, N, K, _native.dtype_code(x2d, "x"),
                                      variant, per_sm * _dispatch.sm_count(device), _native.stream_of(x2d))
    return y, grid


def linear(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
           config: tuple[int, int] | None = None) -> torch.Tensor:
    """y [M, N] = x2d [M, K] @ W.T + bias with the v2 kernel (M <= 64, bf16/fp16, CUDA). `config`:
    (variant, blocks per SM); default: PRUNEKIT_DECODE_V2, else DEFAULT."""
    prep = prepared(values, meta)
    return _launch(x2d, prep.weight, prep.locks, bias, values.shape[0], config or pinned() or DEFAULT)[0]


def _bucket(M: int) -> int:
    return 1 << max(0, (M - 1).bit_length())


def tuned_linear(x2d: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """The dispatcher's entry: the config pinned by PRUNEKIT_DECODE_V2, else the one autotuned for this
    (device, N, K, dtype, bias, M bucket) on first use (`autotune`), else DEFAULT inside a graph capture.
    A capture before the weight was re-laid out takes the dense route (the re-layout cannot be captured)."""
    capturing = _weight_cache.capturing(x2d)
    if capturing and not is_prepared(values, meta):
        return sparse24_dense.linear(x2d, values, meta, bias)
    config = pinned()
    if config is None:
        key = (str(x2d.device), values.shape[0], x2d.shape[1], values.dtype, bias is not None, _bucket(x2d.shape[0]))
        config = _tuned.get(key)
        if config is None:
            if capturing:
                config = DEFAULT
            else:
                with torch.cuda.device(x2d.device):
                    config = _tuned[key] = autotune(key[-1], values, meta, bias)
    return linear(x2d, values, meta, bias, config)


def _feature_error(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> float:
    """max over output features n of ||y[:, n] - ref[:, n]|| / (||ref[:, n]|| + ||(|x|·|w_n|)||)."""
    scale = torch.sqrt((x.double() ** 2) @ (W.double() ** 2).t()).norm(dim=0)
    diff = (got.double() - expected.double()).norm(dim=0)
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((diff / (expected.double().norm(dim=0) + scale).clamp_min(1e-30)).max())


def autotune(M: int, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """Checks every config against F.linear on the unpacked weight (a config that raises or disagrees is left
    out, with an error logged) and times the rest under CUDA graphs with the weight rotated over enough
    copies to exceed twice the L2; returns the fastest. Raises when no config works."""
    N, K = values.shape[0], 2 * values.shape[1]
    device = values.device
    gen = torch.Generator(device=device).manual_seed(0)
    probe = torch.randn(M, K, device=device, dtype=values.dtype, generator=gen)
    prep = prepared(values, meta)
    W = sparse24_dense.unpack(values, meta)
    expected = torch.nn.functional.linear(probe.double(), W.double(), None if bias is None else bias.double())
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    copies = [prep.weight] + [prep.weight.clone() for _ in range(min(7, math.ceil(2 * l2 / prep.weight.numel())) - 1)]
    times = {}
    for config in configs():
        try:
            got = _launch(probe, prep.weight, prep.locks, bias, N, config)[0]
            torch.cuda.synchronize(device)  # an asynchronous fault surfaces here
        except (RuntimeError, ValueError) as exc:
            log.error("sparse24 decode v2: config %s failed on N=%d K=%d M=%d %s (%s); not using it",
                      name(config), N, K, M, values.dtype, exc)
            continue
        err = _feature_error(got, expected, probe, W)
        if not err <= TOLERANCE:
            log.error("sparse24 decode v2: config %s disagrees with the dense product on N=%d K=%d M=%d %s "
                      "(max per-feature rel err %.3g); not using it. Please report this.", name(config), N, K, M,
                      values.dtype, err)
            continue
        times[config] = _timing.time_us(
            [lambda w=w, c=config: _launch(probe, w, prep.locks, bias, N, c) for w in copies], "decode v2")[0]
    if not times:
        raise RuntimeError(f"sparse24 decode v2: no config works for N={N} K={K} M={M} {values.dtype}")
    best = min(times, key=times.get)
    log.info("sparse24 decode v2 N=%d K=%d M=%d %s: %s -> %s", N, K, M, values.dtype,
             ", ".join(f"{name(c)} {t:.1f} us" for c, t in times.items()), name(best))
    return best


def plan(N: int, K: int, config: tuple[int, int], grid: int) -> ref.Plan:
    """The schedule a launch that reported `grid` blocks ran (splits per tile: `.max_splits()`)."""
    warps, _, chunks = variants()[config[0]]
    return ref.plan(N, K, warps, chunks, grid)


# ---- the torch custom op on a prepared weight ----

def _check(x, weight, locks, bias, N, variant, blocks_per_sm) -> None:
    if x.dim() != 2 or x.dtype not in _BF16_FP16:
        raise ValueError(f"sparse24_decode_v2: x must be 2-D float16/bfloat16 [M, K], got {x.dtype} {tuple(x.shape)}")
    M, K = x.shape
    if not 1 <= M <= 64:
        raise ValueError(f"sparse24_decode_v2: x has M={M} rows; the decode kernel takes 1..64")
    if K % 8:
        raise ValueError(f"sparse24_decode_v2: K={K} must be a multiple of 8")
    ref.check_layout(weight, N, K)
    if locks.dtype != torch.int32 or locks.dim() != 1:
        raise ValueError(f"sparse24_decode_v2: locks must be a 1-D int32 tensor, got {locks.dtype} "
                         f"{tuple(locks.shape)}")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"sparse24_decode_v2: bias must be [{N}] {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    for label, t in (("weight", weight), ("locks", locks), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"sparse24_decode_v2: {label} is on {t.device} but x is on {x.device}")
    if variant < 0 or blocks_per_sm < 1:
        raise ValueError(f"sparse24_decode_v2: bad config variant={variant}, blocks_per_sm={blocks_per_sm}")


@torch.library.custom_op("prunekit::sparse24_decode_v2", mutates_args=())
def decode_v2(x: torch.Tensor, weight: torch.Tensor, locks: torch.Tensor, bias: torch.Tensor | None, N: int,
              variant: int, blocks_per_sm: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T + bias, W in the v2 layout (`prepared(values, meta).weight`). `locks` is
    written during the launch and left as it was (zero)."""
    _check(x, weight, locks, bias, N, variant, blocks_per_sm)
    values, meta = ref.restore(weight, N, x.shape[1], x.dtype)
    return F.linear(x, ref.pack24.unpack24(values, meta), bias)


@decode_v2.register_fake
def _(x, weight, locks, bias, N, variant, blocks_per_sm):
    _check(x, weight, locks, bias, N, variant, blocks_per_sm)
    return x.new_empty(x.shape[0], N)


@decode_v2.register_kernel("cuda")
def _(x, weight, locks, bias, N, variant, blocks_per_sm):
    _check(x, weight, locks, bias, N, variant, blocks_per_sm)
    if locks.numel() < _native.require_cuda_module().sparse24_decode_v2_lock_count(N, variant):
        raise ValueError(f"sparse24_decode_v2: locks has {locks.numel()} entries, variant {variant} needs "
                         f"{_native.require_cuda_module().sparse24_decode_v2_lock_count(N, variant)}")
    return _launch(x, weight, locks, bias, N, (variant, blocks_per_sm))[0]
