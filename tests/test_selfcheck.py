"""First-use self-checks (ops/selfcheck.py): a broken GPU route is caught on its probe, disabled once for the
process with a logged error, and the call falls back to a route that agrees with the reference. Exercised
on CPU tensors: the GPU routes are plain functions (Triton under the interpreter, or monkeypatched)."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from prunekit.ops import obs_sweep as sweep_op
from prunekit.ops import pack24 as pack_ops
from prunekit.ops import select_mask, selfcheck
from prunekit.ref import obs_sweep as ref_sweep_mod
from prunekit.ref import selection

ref_sweep = ref_sweep_mod.obs_sweep


def block(rows, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, B, generator=g)
    X = torch.randn(4 * B, B, generator=g)
    H = X.t() @ X / (4 * B) + 0.1 * torch.eye(B)
    L = torch.linalg.cholesky(torch.linalg.inv(H.double()), upper=True).float()
    return W, L.contiguous(), torch.zeros(rows, B, dtype=torch.bool)


def stub_sweep_routes(monkeypatch, triton):
    monkeypatch.setattr(sweep_op._native, "cuda_module", lambda: None)
    monkeypatch.setattr(sweep_op, "_triton_launcher", lambda: (triton, ""))
    monkeypatch.delenv("PRUNEKIT_SWEEP_BACKEND", raising=False)
    monkeypatch.delenv(selfcheck.ENV, raising=False)


def equal_outputs(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_broken_sweep_is_caught_disabled_once_and_falls_back(monkeypatch, caplog):
    calls = []

    def broken(W1, Hinv1, keep, n, m):  # right shapes, wrong mask in the last row
        calls.append(W1.shape[0])
        q, err, loss, k = ref_sweep(W1, Hinv1, keep, n, m)
        k = k.clone()
        k[-1] = ~k[-1]
        return q, err, loss, k

    stub_sweep_routes(monkeypatch, broken)
    W, U, keep = block(37, 16)
    with caplog.at_level(logging.ERROR, logger="prunekit"):
        got = sweep_op._cuda_kernel(W, U, keep, 2, 4)
    assert equal_outputs(got, ref_sweep(W, U, keep, 2, 4))
    assert calls == [8]  # the probe (8 rows) only: the real call went to the reference
    assert selfcheck.is_disabled("obs_sweep", "triton", W.device)
    [record] = [r for r in caplog.records if "self-check" in r.getMessage()]
    msg = record.getMessage()
    assert "obs_sweep" in msg and "triton" in msg and "cpu" in msg and "(8, 16)" in msg and "differ" in msg
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="prunekit"):
        again = sweep_op._cuda_kernel(W, U, keep, 2, 4)  # another shape would not re-check either
    assert equal_outputs(again, got) and calls == [8] and not caplog.records


def test_good_route_is_checked_once_per_shape_class(monkeypatch):
    calls = []

    def good(*args):
        calls.append(args[0].shape[0])
        return ref_sweep(*args)

    stub_sweep_routes(monkeypatch, good)
    W, U, keep = block(37, 16)
    sweep_op._cuda_kernel(W, U, keep, 2, 4)
    sweep_op._cuda_kernel(W, U, keep, 2, 4)
    assert calls == [8, 37, 37]
    W2, U2, keep2 = block(20, 8, seed=1)  # a new shape class: checked again
    sweep_op._cuda_kernel(W2, U2, keep2, 2, 4)
    assert calls[3:] == [8, 20]
    assert [v["ok"] for v in selfcheck.verdicts()] == [True, True]


def test_raising_route_and_asynchronous_fault_are_caught(monkeypatch):
    def raising(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    stub_sweep_routes(monkeypatch, raising)
    W, U, keep = block(9, 8)
    assert equal_outputs(sweep_op._cuda_kernel(W, U, keep, 0, 0), ref_sweep(W, U, keep, 0, 0))
    assert "illegal memory access" in selfcheck.disabled()[("obs_sweep", "triton", "cpu")]

    selfcheck.reset()
    stub_sweep_routes(monkeypatch, ref_sweep)  # the launch "succeeds"; the fault surfaces at the sync

    def faulting_sync(device):
        raise RuntimeError("CUDA error: unspecified launch failure")

    monkeypatch.setattr(selfcheck, "synchronize", faulting_sync)
    assert equal_outputs(sweep_op._cuda_kernel(W, U, keep, 0, 0), ref_sweep(W, U, keep, 0, 0))
    assert "launch failure" in selfcheck.disabled()[("obs_sweep", "triton", "cpu")]


def test_off_switch_and_graph_capture(monkeypatch):
    calls = []

    def broken(*args):
        calls.append(1)
        q, err, loss, k = ref_sweep(*args)
        return q + 1, err, loss, k

    stub_sweep_routes(monkeypatch, broken)
    W, U, keep = block(9, 8)
    monkeypatch.setattr(selfcheck, "capturing", lambda device: True)  # never checked inside a capture
    assert equal_outputs(sweep_op._cuda_kernel(W, U, keep, 2, 4), ref_sweep(W, U, keep, 2, 4))
    assert calls == [] and not selfcheck.disabled()
    monkeypatch.setenv(selfcheck.ENV, "0")  # benchmarks: no checks at all
    assert torch.equal(sweep_op._cuda_kernel(W, U, keep, 2, 4)[0], ref_sweep(W, U, keep, 2, 4)[0] + 1)
    monkeypatch.setenv(selfcheck.ENV, "maybe")
    with pytest.raises(ValueError, match=selfcheck.ENV):
        sweep_op._cuda_kernel(W, U, keep, 2, 4)


def test_gpu_sweep_rejects_a_bad_hinv_diagonal(monkeypatch):
    stub_sweep_routes(monkeypatch, ref_sweep)
    W, U, keep = block(5, 8)
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        U2 = U.clone()
        U2[3, 3] = bad
        with pytest.raises(ValueError, match="non-positive or non-finite diagonal"):
            sweep_op._cuda_kernel(W, U2, keep, 0, 0)


def test_broken_pack_and_selection_kernels_fall_back(monkeypatch):
    from prunekit.kernels import pack24 as pack_kernel

    g = torch.Generator().manual_seed(3)
    W = torch.randn(10, 24, generator=g) * selection.nm_keep_mask(torch.rand(10, 24, generator=g), 2, 4)
    real_pack = pack_kernel.pack24

    def bad_pack(w):
        values, meta = real_pack(w)
        return values * 2, meta

    monkeypatch.setattr(pack_kernel, "pack24", bad_pack)
    got = pack_ops.checked_pack24(W)
    want = pack_ops.ref.pack24(W)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert selfcheck.is_disabled("pack24", "triton", "cpu")

    scores = torch.randn(6, 16, generator=g)
    got = select_mask._checked("nm_keep_mask", lambda s: ~selection.nm_keep_mask(s, 2, 4),
                               lambda s: selection.nm_keep_mask(s, 2, 4), scores, shape_class=(16, 2, 4))
    assert torch.equal(got, selection.nm_keep_mask(scores, 2, 4))
    assert selfcheck.is_disabled("nm_keep_mask", "triton", "cpu")


def test_input_errors_do_not_disable_a_route(monkeypatch):
    from prunekit.kernels import pack24 as pack_kernel

    over_full = torch.ones(4, 8)
    with pytest.raises(ValueError, match="not 2:4"):
        pack_ops.checked_pack24(over_full)
    assert not selfcheck.disabled()
    assert pack_kernel is not None


def test_row_gate_catches_two_bad_rows_of_11008():
    """The sparse24 dispatcher's gate: per output feature, so 2 wrong features of 11008 fail it, where a
    relative error over the whole output (the old gate) would have been ~1.3e-2 < 2e-2."""
    from prunekit.ops import sparse24_dispatch as dispatch

    g = torch.Generator().manual_seed(0)
    N, K = 11008, 64
    x = torch.randn(1, K, generator=g)
    W = torch.randn(N, K, generator=g)
    ref = x @ W.t()
    compare = dispatch._compare(x, W)
    rounded = ref.bfloat16().float()  # what a correct bf16 kernel returns
    assert compare(rounded, ref)[0] < compare.tolerance / 4
    bad = rounded.clone()
    typical = (ref[0].abs() - ref.pow(2).mean().sqrt()).abs().argsort()[:2]  # two features of typical size
    bad[0, typical] = 0  # ... that the kernel failed to write (e.g. a lost tail)
    global_err = float((bad - ref).norm() / ref.norm())
    assert global_err < 2e-2  # what the old whole-output gate measured: it passed
    assert compare(bad, ref)[0] > 10 * compare.tolerance
    cancels = ref.clone()  # a feature whose dot product cancels to ~0 is judged against its terms
    assert compare(cancels + 1e-4, ref)[0] < compare.tolerance


def test_row_relative_error_is_per_row_and_nan_fails():
    expected = torch.ones(1000, 4)
    got = expected.clone()
    got[5] = 0
    assert selfcheck.row_relative_error(got, expected) == pytest.approx(1.0)
    got[5] = float("nan")
    assert selfcheck.row_relative_error(got, expected) == float("inf")


def test_device_guards_enter_the_tensors_device(monkeypatch):
    """Every Triton launcher enters kernels._launch.on_device with the tensor it launches for; the guard
    makes a CUDA tensor's device current (checked with a fake cuda:1 tensor) and is a no-op on CPU."""
    from prunekit.kernels import _launch, calib_stats, obs_sweep, pack24, select_mask as sel
    from prunekit.ops import _dispatch

    entered = []
    real = _launch.on_device

    def recording(t):
        entered.append(t.device)
        return real(t)

    monkeypatch.setattr(_launch, "on_device", recording)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=g) * selection.nm_keep_mask(torch.rand(8, 16, generator=g), 2, 4)
    values, meta = pack24.pack24(W)
    pack24.unpack24(values, meta)
    sel.nm_keep_mask_triton(W.abs().contiguous(), 2, 4)
    sel.row_keep_mask_triton(W.abs().contiguous(), 0.5)
    sel.wanda_keep_mask_triton(W, torch.rand(16, generator=g), 0.5)
    calib_stats.sum_sq_triton(W)
    Wb, U, keep = block(4, 8)
    obs_sweep.obs_sweep_triton(Wb, U, keep, 2, 4)
    assert entered == [torch.device("cpu")] * 7

    class FakeCuda1:
        device = torch.device("cuda", 1)

    guard = real(FakeCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = _dispatch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_dispatch.device_guard(torch.device("cuda", 0)), torch.cuda.device)


def test_triton_sweep_compiles_to_round_to_nearest_without_fma():
    """Compiled for sm_90 (no GPU needed): every division is div.rn (not the approximate div.full /
    div.approx a plain `/` gives) and no FMA contraction (w - e*h rounds the product, then the difference),
    so the GPU's masks equal the reference's as the interpreter's do."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from prunekit.kernels import obs_sweep as k\n"
            "print(k.compile_ptx(B=128, n=2, m=4, capability=90))\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr.lower():
        pytest.skip(f"Triton cannot compile for sm_90 here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    ptx = run.stdout
    assert ".target sm_90" in ptx
    assert "div.rn.f32" in ptx
    for forbidden in ("div.full", "div.approx", "fma.rn.f32", "fma.f32"):
        assert forbidden not in ptx, forbidden


def test_dispatcher_checks_a_forced_kernel_and_falls_back_to_dense(monkeypatch):
    """A registered kernel forced with PRUNEKIT_SPARSE24_KERNEL is self-checked per output feature against
    the unpacked weight; a kernel that gets one feature wrong is disabled and the dense route answers."""
    import torch.nn.functional as F

    from prunekit.ops import sparse24_dense
    from prunekit.ops import sparse24_dispatch as dispatch

    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 64, generator=g) * selection.nm_keep_mask(torch.rand(300, 64, generator=g), 2, 4)
    values, meta = pack_ops.ref.pack24(W)
    x = torch.randn(3, 64, generator=g)
    calls = []

    def one_wrong_feature(x2d, v, m, b):
        calls.append(x2d.shape[0])
        y = F.linear(x2d, sparse24_dense.unpack(v, m), b)
        y[:, 123] += 1.0
        return y

    monkeypatch.setitem(dispatch.KERNELS, "fake", dispatch.Kernel("fake", one_wrong_feature, lambda *a: True))
    monkeypatch.setenv("PRUNEKIT_SPARSE24_KERNEL", "fake")
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    y = dispatch.linear_cuda(x, values, meta, None)
    torch.testing.assert_close(y, F.linear(x, W))
    assert calls == [3] and selfcheck.is_disabled("sparse24_linear", "fake", "cpu")
    assert "fake" not in dispatch._candidates(x, values)
    sparse24_dense.clear_cache()
