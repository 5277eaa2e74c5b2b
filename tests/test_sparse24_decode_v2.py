"""Decode kernel v2: its pack-time layout (exact round trip), the lane/register mapping and schedule emulated on
the CPU against x·Wᵀ, the torch custom op, and GPU comparisons of every variant with the dense product."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from prunekit.ops import pack24 as pack_ops
from prunekit.ops import sparse24_decode_v2 as v2_ops
from prunekit.ref import pack24 as ref_pack
from prunekit.ref import selection
from prunekit.ref import sparse24_decode_v2 as v2

ODD_SHAPES = [(1, 16, 64), (3, 40, 200), (11, 17, 72), (9, 33, 8)]  # (M, N, K): tails in N, K and M


def random_24_weight(n, k, gen, dtype=torch.bfloat16):
    W = torch.randn(n, k, generator=gen)
    W = W * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)
    W[: min(n, 3), :8] = 0  # all-zero groups: explicit zeros in the format
    return W.to(dtype)


# ---------------- the layout ----------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(16, 64), (17, 72), (40, 200), (3, 8), (33, 136)])
def test_relayout_round_trips_exactly(dtype, n, k, gen):
    W = random_24_weight(n, k, gen, dtype)
    W[-1, 5] = -0.0  # raw bits survive
    values, meta = ref_pack.pack24(W)
    dev = v2.relayout(values, meta)
    tiles, chunks = v2.padded_sizes(n, k)
    assert dev.dtype == torch.uint8 and tuple(dev.shape) == (tiles, chunks, v2.BLOCK_BYTES)
    back_values, back_meta = v2.restore(dev, n, k, dtype)
    assert torch.equal(back_values.view(torch.int16), values.view(torch.int16))
    assert torch.equal(back_meta, meta)


def test_padding_is_zero_weights_with_a_valid_nibble(gen):
    n, k = 17, 72  # pads to 32 rows, 128 inputs
    values, meta = ref_pack.pack24(random_24_weight(n, k, gen))
    dev = v2.relayout(values, meta)
    full_values, full_meta = v2.restore(dev, 32, 128, torch.bfloat16)
    assert torch.equal(full_values[:n, : k // 2].view(torch.int16), values.view(torch.int16))
    assert not full_values[n:].view(torch.int16).any() and not full_values[:, k // 2:].view(torch.int16).any()
    nib = ref_pack.nibbles(full_meta)
    assert bool((nib[n:] == v2.ZERO_NIBBLE).all()) and bool((nib[:, k // 4:] == v2.ZERO_NIBBLE).all())


def _id_weight(tiles=1, chunks=1):
    """values whose int16 bits are (row, compressed column) ids, and meta whose nibbles cycle over the
    valid ones by (row, group): to read the layout's byte positions back."""
    n, k = 16 * tiles, 64 * chunks
    rows = torch.arange(n).unsqueeze(1)
    cols = torch.arange(k // 2).unsqueeze(0)
    values = (rows * 1000 + cols).to(torch.int16).view(torch.bfloat16)
    groups = torch.arange(k // 4).unsqueeze(0)
    nib = torch.tensor(ref_pack.VALID_NIBBLES)[(rows * 5 + groups) % 6]
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    return values, meta, nib


def test_each_lane_register_holds_the_documented_group():
    values, meta, _ = _id_weight()
    block = v2.relayout(values, meta)[0, 0]
    for j in range(2):
        a, _ = v2.lane_registers(block, j)
        for lane in range(32):
            for reg in range(4):
                row, group = v2.a_register_source(lane, j, reg)
                assert a[lane][reg] == [row * 1000 + 2 * group, row * 1000 + 2 * group + 1]


def test_each_lane_metadata_word_holds_the_documented_nibbles():
    values, meta, nib = _id_weight()
    block = v2.relayout(values, meta)[0, 0]
    _, e = v2.lane_registers(block, 0)
    for lane in range(32):
        for i in range(8):
            row, group = v2.meta_word_source(lane, i)
            assert (e[lane] >> (4 * i)) & 0xF == int(nib[row, group])


def test_fragments_cover_the_tile_once_and_selectors_match_the_steps():
    a_seen, m_seen = Counter(), Counter()
    for j in range(2):
        for lane in range(32):
            for reg in range(4):
                a_seen[v2.a_register_source(lane, j, reg)] += 1
    for lane in range(32):
        t = lane % 4
        for i in range(8):
            row, group = v2.meta_word_source(lane, i)
            m_seen[(row, group)] += 1
            assert group // 8 == t // 2  # the word is read by the step whose selector (t // 2) picks this lane
    every = Counter({(r, grp): 1 for r in range(16) for grp in range(16)})
    assert a_seen == every and m_seen == every
    for lane in range(32):  # A registers of step j: slot groups t (a0, a1) and t + 4 (a2, a3) of that step
        t = lane % 4
        for j in range(2):
            assert [v2.a_register_source(lane, j, r)[1] for r in range(4)] == [8 * j + t, 8 * j + t, 8 * j + t + 4,
                                                                               8 * j + t + 4]


def test_b_and_d_fragments_cover_once():
    for g in range(8):
        ks = Counter()
        for j in range(2):
            for t in range(4):
                for r in range(4):
                    k = v2.b_register_k(4 * g + t, j, r)
                    ks.update([k, k + 1])
        assert ks == Counter({k: 1 for k in range(64)})
    assert sorted(v2.d_register_position(lane, i) for lane in range(32) for i in range(4)) == \
        [(r, n) for r in range(16) for n in range(8)]


# ---------------- the schedule ----------------

@pytest.mark.parametrize("n,k,warps,chunks,blocks", [
    (11008, 4096, 4, 1, 132), (11008, 4096, 8, 2, 264), (4096, 4096, 4, 1, 132), (4096, 11008, 8, 1, 132),
    (40, 200, 1, 1, 7), (17, 72, 2, 2, 1), (257, 1000, 4, 2, 500), (16, 64, 8, 1, 3)])
def test_schedule_covers_every_unit_once_in_a_safe_order(n, k, warps, chunks, blocks):
    p = v2.plan(n, k, warps, chunks, blocks)
    assert p.grid <= blocks
    units, orders = Counter(), {}
    for b in range(p.grid):
        segs = p.segments(b)
        assert segs, f"block {b} has no work"
        for idx, (tile, kb, ke, order, count) in enumerate(segs):
            units.update((tile, kt) for kt in range(kb, ke))
            orders.setdefault(tile, []).append(order)
            first, last = p.tile_blocks(tile)
            assert first <= b <= last and count == last - first + 1
            if order > 0:  # waits for block b + 1, whose part of this tile is the first thing it does
                assert p.segments(b + 1)[0][0] == tile and idx == len(segs) - 1
    assert units == Counter({(t, kt): 1 for t in range(p.block_tiles) for kt in range(p.k_iters)})
    assert all(sorted(o) == list(range(len(o))) for o in orders.values())


# ---------------- the whole kernel, emulated ----------------

@pytest.mark.parametrize("m,n,k,warps,chunks,blocks", [
    *[(m, n, k, 1, 1, 1) for m, n, k in ODD_SHAPES], *[(m, n, k, 2, 2, 5) for m, n, k in ODD_SHAPES],
    (3, 40, 200, 4, 2, 3),   # a compiled variant's shape: block tile with a warp past the last row tile
    (17, 24, 136, 8, 1, 2)])
def test_emulated_kernel_reproduces_dense_product(m, n, k, warps, chunks, blocks, gen):
    W = random_24_weight(n, k, gen)
    values, meta = ref_pack.pack24(W)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y = v2.emulate_linear(x, v2.relayout(values, meta), n, torch.bfloat16, warps=warps, chunks_per_stage=chunks,
                          blocks=blocks)
    torch.testing.assert_close(y, x.double() @ W.double().t())


def test_emulated_ordered_reduction_with_bias_and_rounding(gen):
    m, n, k = 5, 16, 512
    W = random_24_weight(n, k, gen, torch.float16)
    values, meta = ref_pack.pack24(W)
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    bias = torch.randn(n, generator=gen).to(torch.float16)
    p = v2.plan(n, k, 1, 1, 5)
    assert p.max_splits() >= 3  # several blocks per tile: the ordered reduction runs
    y = v2.emulate_linear(x, v2.relayout(values, meta), n, torch.float16, bias, warps=1, blocks=5,
                          out_dtype=torch.float16)
    expected = x.double() @ W.double().t() + bias.double()
    err = float(((y - expected).norm(dim=1) / expected.norm(dim=1)).max())
    assert err < 3e-3  # a few fp16 roundings of partial sums


# ---------------- the torch op (CPU: reference on the restored weight) ----------------

def test_custom_op_on_cpu_and_fake(gen):
    m, n, k = 3, 40, 200
    W = random_24_weight(n, k, gen)
    values, meta = ref_pack.pack24(W)
    weight = v2.relayout(values, meta)
    locks = torch.zeros(4, dtype=torch.int32)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    y = torch.ops.prunekit.sparse24_decode_v2(x, weight, locks, bias, n, 0, 1)
    assert torch.equal(y, F.linear(x, W, bias))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = torch.ops.prunekit.sparse24_decode_v2(mode.from_tensor(x), mode.from_tensor(weight),
                                                     mode.from_tensor(locks), None, n, 0, 1)
    assert tuple(fake.shape) == (m, n) and fake.dtype == torch.bfloat16


def test_custom_op_passes_opcheck(gen):
    n, k = 24, 72
    values, meta = ref_pack.pack24(random_24_weight(n, k, gen))
    args = (torch.randn(2, k, generator=gen).to(torch.bfloat16), v2.relayout(values, meta),
            torch.zeros(2, dtype=torch.int32), torch.randn(n, generator=gen).to(torch.bfloat16), n, 1, 1)
    torch.library.opcheck(torch.ops.prunekit.sparse24_decode_v2.default, args)


@pytest.mark.parametrize("case,match", [
    ("rows", "1..64"), ("layout", "v2 decode layout"), ("bias", "bias must be"), ("dtype", "float16/bfloat16"),
    ("locks", "int32")])
def test_custom_op_rejects_bad_input(case, match, gen):
    n, k = 40, 200
    values, meta = ref_pack.pack24(random_24_weight(n, k, gen))
    weight = v2.relayout(values, meta)
    locks = torch.zeros(4, dtype=torch.int32)
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16)
    bias = None
    if case == "rows":
        x = torch.zeros(65, k, dtype=torch.bfloat16)
    elif case == "layout":
        weight = weight[:, :-1]
    elif case == "bias":
        bias = torch.zeros(n + 1, dtype=torch.bfloat16)
    elif case == "dtype":
        x = x.float()
    else:
        locks = locks.long()
    with pytest.raises(ValueError, match=match):
        torch.ops.prunekit.sparse24_decode_v2(x, weight, locks, bias, n, 0, 1)


def test_relayout_rejects_fp32(gen):
    values, meta = ref_pack.pack24(random_24_weight(16, 64, gen, torch.float32))
    with pytest.raises(TypeError, match="float16/bfloat16"):
        v2.relayout(values, meta)


def test_not_a_candidate_without_cuda_tensors(gen):
    assert not v2_ops.supports(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(16, 32, dtype=torch.bfloat16))


def test_autotune_leaves_out_failing_configs_and_picks_the_fastest(monkeypatch, caplog, gen):
    # the kernel replaced by the reference (CPU): config 0 raises, config 1 is wrong, 2 and 3 are right
    n, k, m = 40, 200, 3
    W = random_24_weight(n, k, gen)
    values, meta = ref_pack.pack24(W)
    fake_variants = ((4, 4, 1), (4, 3, 2))
    monkeypatch.setattr(v2_ops, "variants", lambda: fake_variants)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"L2_cache_size": 1})())

    def fake_launch(x, weight, locks, bias, N, config):
        if config == (0, 1):
            raise RuntimeError("sparse24_decode_v2: CUDA error (illegal address)")
        back_values, back_meta = v2.restore(weight, N, x.shape[1], x.dtype)
        y = F.linear(x, ref_pack.unpack24(back_values, back_meta), bias)
        return (y + 1 if config == (0, 2) else y), 1
    monkeypatch.setattr(v2_ops, "_launch", fake_launch)
    speed = {(1, 1): 9.0, (1, 2): 7.0}

    def fake_time(calls, what):
        for call in calls:
            call()
        return speed[current[0]], "graph"
    monkeypatch.setattr(v2_ops._timing, "time_us", fake_time)
    current = [None]
    real_configs = v2_ops.configs

    def configs():
        for c in real_configs():
            current[0] = c
            yield c
    monkeypatch.setattr(v2_ops, "configs", configs)
    v2_ops.clear_cache()
    with caplog.at_level("ERROR", logger="prunekit"):
        assert v2_ops.autotune(m, values, meta, None) == (1, 2)
    assert "v2_w4s4c1_b1 failed" in caplog.text and "v2_w4s4c1_b2 disagrees" in caplog.text


@pytest.mark.parametrize("ordered", [0, 1])
def test_ptx_uses_both_selectors_on_one_metadata_register_in_either_form(ordered, tmp_path):
    """CUDA 12.0-12.4 has no mma.sp::ordered_metadata: the gate (prunekit/mma_sp.h, shared with sparse24_gemm.cu) then emits plain mma.sp.
    Either way each chunk is two mma.sp on the same metadata register, selector 0 then 1."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here")
    root = Path(__file__).resolve().parents[1]
    ptx = tmp_path / "v2.ptx"
    subprocess.run([nvcc, "-std=c++17", f"-I{root / 'csrc/include'}", f"-DPRUNEKIT_MMA_SP_ORDERED={ordered}",
                    "-DPRUNEKIT_DECODE_V2_ONE_INSTANCE", "-gencode=arch=compute_80,code=compute_80", "-ptx",
                    str(root / "csrc/cuda/sparse24_decode_v2.cu"), "-o", str(ptx)], check=True, capture_output=True,
                   timeout=300)
    form = "mma.sp::ordered_metadata" if ordered else "mma.sp"
    found = re.findall(r"(mma\.sp\S*)\.sync\.aligned\.m16n8k32\.row\.col\.f32\.(\w+)\.\w+\.f32 .*, (%r\d+), (\d);",
                       ptx.read_text())
    assert [f[0] for f in found] == [form] * 4
    assert [(f[1], f[3]) for f in found] == [("bf16", "0"), ("bf16", "1"), ("f16", "0"), ("f16", "1")]
    assert found[0][2] == found[1][2] and found[2][2] == found[3][2]  # one metadata word serves both steps


def test_registered_with_the_dispatcher_and_its_copy_dropped_when_unused(gen, monkeypatch):
    from prunekit.ops import sparse24_dispatch as dispatch

    assert dispatch.KERNELS["v2"].fn is v2_ops.tuned_linear and dispatch.KERNELS["v2"].supports is v2_ops.supports
    values, meta = ref_pack.pack24(random_24_weight(16, 64, gen))
    v2_ops.prepared(values, meta)
    key = ("cuda:0", 16, 64, torch.bfloat16, False, 1)
    monkeypatch.setattr(dispatch, "_choices", {key: "v2"})
    dispatch._drop_unused_copies(key, values)
    assert v2_ops.is_prepared(values, meta)  # v2 serves this shape: kept
    monkeypatch.setattr(dispatch, "_choices", {key: "dense"})
    dispatch._drop_unused_copies(key, values)
    assert not v2_ops.is_prepared(values, meta)


# ---------------- GPU: the real kernel against the dense product ----------------

def _case(m, n, k, dtype, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)
    W = random_24_weight(n, k, gen, dtype)
    values, meta = pack_ops.pack24(W)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    expected = F.linear(x.double(), W.double(), None if b is None else b.double())
    return x.cuda(), values.cuda(), meta.cuda(), None if b is None else b.cuda(), expected, W


def _row_err(y, expected):
    y = y.double().cpu()
    return float(((y - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-6)).max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("n,k", [(16, 64), (40, 200), (257, 192), (1000, 1032), (4096, 4096)])
def test_every_config_matches_dense(dtype, m, n, k):
    x, values, meta, b, expected, _ = _case(m, n, k, dtype, m * 1000 + n, bias=(m % 2 == 1))
    for config in v2_ops.configs() + [(v, 16) for v in range(len(v2_ops.variants()))]:  # 16/SM: many splits
        y = v2_ops.linear(x, values, meta, b, config=config)
        assert y.dtype == dtype and y.shape == (m, n)
        err = _row_err(y, expected)
        assert err < 1e-2, f"{v2_ops.name(config)}: max row rel err {err}"
    assert not v2_ops.prepared(values, meta).locks.any(), "locks must be left zero"


@pytest.mark.gpu
def test_exact_on_small_integers_with_many_splits():
    # fp16 holds every partial sum here exactly (|y| < 2048), so the ordered reduction must be exact too
    gen = torch.Generator().manual_seed(1)
    n, k, m = 48, 256, 13
    W = (torch.randint(-3, 4, (n, k), generator=gen).float()
         * selection.nm_keep_mask(torch.rand(n, k, generator=gen), 2, 4)).to(torch.float16)
    x = torch.randint(-3, 4, (m, k), generator=gen).to(torch.float16)
    values, meta = pack_ops.pack24(W)
    for config in v2_ops.configs() + [(0, 64)]:
        y = v2_ops.linear(x.cuda(), values.cuda(), meta.cuda(), None, config=config)
        assert torch.equal(y.float().cpu(), x.float() @ W.float().t()), config


@pytest.mark.gpu
def test_deterministic_and_graph_capturable():
    x, values, meta, b, expected, _ = _case(5, 4096, 4096, torch.bfloat16, 7, bias=True)
    first = v2_ops.linear(x, values, meta, b, config=(0, 2))
    assert all(torch.equal(first, v2_ops.linear(x, values, meta, b, config=(0, 2))) for _ in range(5))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = v2_ops.linear(x, values, meta, b, config=(0, 2))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@pytest.mark.gpu
def test_tuned_linear_autotunes_once_per_key():
    v2_ops.clear_cache()
    x, values, meta, b, expected, _ = _case(3, 1000, 1032, torch.bfloat16, 9, bias=True)
    y = v2_ops.tuned_linear(x, values, meta, b)
    assert _row_err(y, expected) < 1e-2
    ((key, config),) = v2_ops.tuned().items()
    assert config in v2_ops.configs() and key[1:] == (1000, 1032, torch.bfloat16, True, 4)
    y2 = v2_ops.tuned_linear(x[:2], values, meta, b)  # M = 2 is another bucket: tuned anew
    assert _row_err(y2, expected[:2]) < 1e-2 and len(v2_ops.tuned()) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["v2", "auto"])
def test_sparse_linear_through_the_dispatcher(mode, monkeypatch):
    from prunekit.nn.sparse_linear import SparseLinear
    from prunekit.ops import selfcheck
    from prunekit.ops import sparse24_dispatch as dispatch

    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", mode)
    dispatch.clear_cache()
    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(520, 300).to(torch.bfloat16)  # K % 64 != 0: v1 declines, v2 serves
    with torch.no_grad():
        lin.weight.copy_(random_24_weight(300, 520, gen))
    sparse = SparseLinear.from_dense(lin).cuda().requires_grad_(False)
    lin = lin.cuda()
    for lead in [(1,), (5,), (2, 3), (64,), (65,)]:
        x = torch.randn(*lead, 520, generator=gen).to(torch.bfloat16).cuda()
        expected = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        y = sparse(x)
        assert y.shape == (*lead, 300)
        assert float((y.float() - expected).norm() / expected.norm()) < 1e-2
    assert not selfcheck.is_disabled("sparse24_linear", "v2", x.device)
    if mode == "v2":
        assert v2_ops.is_prepared(sparse.values, sparse.meta) and v2_ops.tuned()


@pytest.mark.gpu
def test_custom_op_on_cuda_and_odd_views():
    x, values, meta, b, expected, _ = _case(6, 40, 200, torch.bfloat16, 3, bias=True)
    prep = v2_ops.prepared(values, meta)
    y = torch.ops.prunekit.sparse24_decode_v2(x, prep.weight, prep.locks, b, 40, 1, 1)
    assert _row_err(y, expected) < 1e-2
    buf = torch.zeros(x.numel() + 1, dtype=x.dtype, device="cuda")
    x_view = buf[1:].view(x.shape).copy_(x)  # not 16-byte aligned: cloned by the launcher
    assert torch.equal(v2_ops.linear(x_view, values, meta, b, config=(1, 1)), y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_on_a_device_that_is_not_current():
    x, values, meta, b, expected, _ = _case(3, 64, 256, torch.bfloat16, 5)
    with torch.cuda.device(0):
        y = v2_ops.linear(x.to("cuda:1"), values.to("cuda:1"), meta.to("cuda:1"), None, config=(0, 1))
        torch.cuda.synchronize(1)
    assert y.device == torch.device("cuda:1") and _row_err(y, expected) < 1e-2
