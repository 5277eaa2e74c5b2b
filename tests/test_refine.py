"""Refinement steps (prunekit.pruning.refine / least_squares / dsnot): each equals its plain reference,
never raises the layer's reconstruction error, keeps the exact pattern, and plugs into prunekit.prune."""
from __future__ import annotations

import pytest
import torch

import prunekit as pk
from prunekit import calibrate
from prunekit.pruning.dsnot import dsnot_swaps
from prunekit.pruning.least_squares import least_squares_weights
from prunekit.pruning.refine import Refined, row_errors
from prunekit.ref import dsnot as ref_dsnot
from prunekit.ref import least_squares as ref_ls

from layers import calib_inputs, hessian, layer


def stats_of(H: torch.Tensor, nsamples: int = 64) -> pk.LayerStats:
    stats = pk.LayerStats(H.shape[0], hessian=True, act_norm=True)
    stats.hessian, stats.act_norm_sq, stats.nsamples = H.clone(), H.diagonal() / 2, nsamples
    return stats


def random_mask(rows, cols, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "2:4":
        order = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
        return keep.scatter_(-1, order[..., :2], True).reshape(rows, cols)
    if kind == "ragged":  # a different kept count per row, some rows empty or full
        keep = torch.rand(rows, cols, generator=g) < torch.rand(rows, 1, generator=g)
        keep[0], keep[1] = False, True
        return keep
    if kind == "shared":  # most rows share one support
        keep = (torch.rand(1, cols, generator=g) < 0.5).expand(rows, cols).clone()
        keep[2] = ~keep[2]
        return keep
    return torch.rand(rows, cols, generator=g) < 0.5


def pattern_ok(mask: torch.Tensor, before: torch.Tensor, pattern: pk.Pattern) -> bool:
    if pattern.is_nm:
        return bool((mask.reshape(mask.shape[0], -1, pattern.m).sum(-1) == pattern.n).all())
    return torch.equal(mask.sum(1), before.sum(1))


# ------------------------------------------------------------------------------- least squares
@pytest.mark.parametrize("kind", ["2:4", "ragged", "shared", "half"])
@pytest.mark.parametrize("rows,cols", [(13, 24), (7, 36)])
def test_least_squares_equals_per_row_normal_equations(rows, cols, kind):
    W, H = layer(rows, cols, seed=rows + cols)
    H[5, :] = 0  # a dead input
    H[:, 5] = 0
    keep = random_mask(rows, cols, kind)
    expected = ref_ls.least_squares_weights(W, keep, H, 0.01)
    for max_bytes in (1 << 28, 2000):  # one batched solve, and many small chunks
        got, used, notes = least_squares_weights(W, keep, H, 0.01, max_bytes=max_bytes)
        assert used == 0.01 and notes == []
        assert not bool(got.ne(0).logical_and(~keep).any())
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_least_squares_is_optimal_on_the_support():
    """The gradient of the damped objective vanishes on the kept weights, and with little damping the
    solution beats SparseGPT's own weights on SparseGPT's mask."""
    W, H = layer(20, 48, seed=4)
    result = pk.sparsegpt_prune(W, H, 0.5)
    got, _, _ = least_squares_weights(W.double(), result.mask, H.double(), 0.01)
    Hd = H.double() + 0.01 * H.diagonal().double().mean() * torch.eye(48, dtype=torch.float64)
    grad = (got.double() - W.double()) @ Hd
    assert float(grad[result.mask].abs().max()) < 1e-5 * float(grad.abs().max())  # float32 output
    assert float(row_errors(W, got, H).sum()) < float(row_errors(W, result.weight, H).sum())


def test_least_squares_escalates_damping_on_a_singular_hessian():
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    H = hessian(calib_inputs(32, samples=8))  # rank 8 < 32
    keep = random_mask(6, 32, "half")
    got, used, notes = least_squares_weights(W, keep, H, 0.0, name="blk.fc")
    assert used > 0 and len(notes) == 1 and "blk.fc" in notes[0]
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), ref_ls.least_squares_weights(W, keep, H, used), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0.7"])
def test_least_squares_step_never_raises_the_error_and_keeps_the_mask(source, pattern):
    W, H = layer(19, 40, seed=7)
    stats = stats_of(H)
    method = {"wanda": pk.Wanda, "sparsegpt": pk.SparseGPT, "magnitude": pk.Magnitude}[source](pattern)
    before = method.prune_layer(W.clone(), stats, "fc")
    after = pk.LeastSquares().apply(W, before, stats, "fc")
    assert torch.equal(after.mask, before.mask)
    assert not bool(after.weight.ne(0).logical_and(~after.mask).any())
    assert (row_errors(W, after.weight, H) <= row_errors(W, before.weight, H)).all()
    (record,) = after.refine
    assert record.error_after <= record.error_before
    if source != "sparsegpt":  # masked dense weights are far from optimal: a clear gain
        assert record.error_after < 0.9 * record.error_before


def test_least_squares_guard_keeps_better_input_rows():
    """Heavy damping pulls the solution toward the dense weights; rows where that is worse (undamped)
    than SparseGPT's weights keep SparseGPT's."""
    W, H = layer(16, 32, seed=1)
    before = pk.sparsegpt_prune(W, H, 0.5)
    after = pk.LeastSquares(percdamp=10).apply(W, before, stats_of(H), "fc")
    solved, _, _ = least_squares_weights(W, before.mask, H, 10)
    worse = row_errors(W, solved, H) > row_errors(W, before.weight, H)
    assert 0 < int(worse.sum()) < 16 and after.refine[0].reverted == int(worse.sum())
    assert torch.equal(after.weight[worse], before.weight[worse])
    assert torch.equal(after.weight[~worse], solved[~worse])


def test_steps_on_bf16_weights_never_raise_the_error():
    """Rows the cast back to bf16 would make worse than their input keep the input."""
    W, H = layer(24, 64, seed=5)
    W = W.bfloat16()
    stats = stats_of(H)
    result = pk.SparseGPT("2:4").prune_layer(W.clone(), stats, "fc")
    for step in (pk.DSnoT(), pk.LeastSquares()):
        result2 = step.apply(W, result, stats, "fc")
        assert result2.weight.dtype == torch.bfloat16
        assert (row_errors(W, result2.weight, H) <= row_errors(W, result.weight, H)).all()
        assert pattern_ok(result2.mask, result.mask, result.pattern)
        result = result2


# ------------------------------------------------------------------------------------- DSnoT
CASES = [(7, 24, "2:4", 1), (9, 20, "0.5", 1), (9, 28, "0.7", 3), (5, 24, "1:4", 1), (6, 24, "2:8", 1)]


@pytest.mark.parametrize("rows,cols,spec,candidates", CASES)
@pytest.mark.parametrize("start", ["masked", "least_squares"])
def test_dsnot_equals_reference(rows, cols, spec, candidates, start):
    W, H = layer(rows, cols, seed=cols)
    pattern = pk.parse_pattern(spec)
    keep = pk.wanda_mask(W, H.diagonal().clone(), pattern)
    w0 = W * keep if start == "masked" else least_squares_weights(W, keep, H)[0]
    exp_w, exp_m, exp_swaps = ref_dsnot.dsnot_swaps(W, w0, keep, H, pattern.n, pattern.m, candidates=candidates)
    got_w, got_m, swaps = dsnot_swaps(W, w0, keep, H, pattern, candidates=candidates, dtype=torch.float64)
    assert swaps == exp_swaps > 0
    assert torch.equal(got_m, exp_m)
    assert torch.equal(got_w, exp_w)
    # float32 (the default) makes the same swaps on these cases
    got_w32, got_m32, swaps32 = dsnot_swaps(W, w0, keep, H, pattern, candidates=candidates)
    assert torch.equal(got_m32, exp_m) and swaps32 == exp_swaps


@pytest.mark.parametrize("source", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["0.5", "2:4", "0.7", "4:8"])
def test_dsnot_step_lowers_the_error_and_keeps_the_pattern(source, pattern):
    W, H = layer(23, 56, seed=11)
    stats = stats_of(H)
    method = pk.Wanda(pattern) if source == "wanda" else pk.SparseGPT(pattern)
    before = method.prune_layer(W.clone(), stats, "fc")
    after = pk.DSnoT().apply(W, before, stats, "fc")
    again = pk.DSnoT().apply(W, before, stats, "fc")
    assert torch.equal(after.weight, again.weight) and torch.equal(after.mask, again.mask)  # deterministic
    assert pattern_ok(after.mask, before.mask, after.pattern)
    assert not bool(after.weight.ne(0).logical_and(~after.mask).any())
    assert (row_errors(W, after.weight, H) <= row_errors(W, before.weight, H)).all()
    (record,) = after.refine
    assert record.changed > 0 and record.error_after < record.error_before
    # grown weights take their dense value; kept ones keep theirs (or the dense one: pruned, then regrown)
    grown = after.mask & ~before.mask
    assert torch.equal(after.weight[grown], W[grown])
    same = after.mask & before.mask
    assert (after.weight[same].eq(before.weight[same]) | after.weight[same].eq(W[same])).all()


def test_dsnot_max_iter_bounds_swaps_per_row():
    W, H = layer(10, 40, seed=2)
    keep = pk.wanda_mask(W, H.diagonal().clone(), 0.7)
    _, mask, swaps = dsnot_swaps(W, W * keep, keep, H, 0.7, max_iter=2)
    assert swaps <= 20 and int((mask != keep).sum()) <= 2 * 2 * 10
    _, mask0, swaps0 = dsnot_swaps(W, W * keep, keep, H, 0.7, max_iter=0)
    assert swaps0 == 0 and torch.equal(mask0, keep)


def test_bad_input():
    W, H = layer(4, 8)
    stats = stats_of(H)
    result = pk.Wanda(0.5).prune_layer(W.clone(), stats, "fc")
    with pytest.raises(ValueError, match="fc: .*Hessian"):
        pk.LeastSquares().apply(W, result, pk.LayerStats(8, act_norm=True), "fc")
    bad = pk.LayerResult(weight=W.clone(), mask=result.mask, pattern=result.pattern)
    with pytest.raises(ValueError, match="fc: the pruned weight has nonzeros outside its mask"):
        pk.DSnoT().apply(W, bad, stats, "fc")
    with pytest.raises(ValueError, match="fc Hessian: expected shape"):
        least_squares_weights(W, result.mask, H[:4, :4], name="fc")
    with pytest.raises(ValueError, match="max_iter"):
        pk.DSnoT(max_iter=-1)
    with pytest.raises(ValueError, match="percdamp"):
        pk.LeastSquares(percdamp=-1)
    with pytest.raises(ValueError, match="undo the quantization"):
        Refined(pk.SparseGPT(0.5, quant=pk.QuantSpec(bits=4)), [pk.LeastSquares()])


# ----------------------------------------------------------------------------------- pipeline
def test_pipeline_refine_on_tiny_llama():
    pytest.importorskip("transformers")
    from pipeline_models import calib_ids, tiny_model

    for method in (pk.Wanda("2:4"), pk.SparseGPT(0.5)):
        plain = tiny_model("llama")
        base = pk.prune(plain, method, calib_ids(), progress=False, batch_size=4)
        model = tiny_model("llama")
        steps = [pk.DSnoT(), pk.LeastSquares()]
        report = pk.prune(model, method, calib_ids(), progress=False, batch_size=4, refine=steps)
        assert report.error < 0.9 * base.error
        assert "DSnoT" in report.method and "LeastSquares" in report.method
        modules = dict(model.named_modules())
        for row, base_row in zip(report.layers, base.layers):
            w = calibrate.layer_weight(modules[row.name]).detach()
            if method.pattern.is_nm:
                assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
            else:
                assert row.sparsity >= base_row.sparsity - 1e-9
            assert [r["step"] for r in row.refine] == [repr(s) for s in steps]
            assert all(r["error_after"] <= r["error_before"] for r in row.refine)
        assert "refine DSnoT" in str(report) and "refine LeastSquares" in str(report)
        assert pk.PruneReport.from_dict(report.to_dict()).layers[0].refine == report.layers[0].refine
        if method.pattern.is_nm:
            continue
        # reproducible under a seed
        again = tiny_model("llama")
        pk.prune(again, method, calib_ids(), progress=False, batch_size=4, refine=steps)
        for (k, v), (_, v2) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(v, v2), k


def test_pipeline_refine_bad_input_fails_before_calibration():
    pytest.importorskip("transformers")
    from pipeline_models import calib_ids, tiny_model

    model = tiny_model("llama")
    with pytest.raises(TypeError, match="refine: expected"):
        pk.prune(model, pk.Wanda(0.5), calib_ids(), progress=False, refine="dsnot")
    with pytest.raises(ValueError, match="undo the quantization"):
        pk.prune(model, pk.SparseGPT(0.5, quant=pk.QuantSpec(bits=4)), calib_ids(), progress=False,
                 refine=pk.LeastSquares())
    with pytest.raises(ValueError, match="refine=... needs calibration data"):
        pk.prune(model, pk.Magnitude(0.5), None, progress=False, refine=pk.LeastSquares())
