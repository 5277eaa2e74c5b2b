"""Quantization with pruning: the min-max quantizer's grid (levels, exact zeros), joint SparseGPT
pruning + quantization against a loop-by-loop transcription of the reference fasterprune with a
quantizer, exact sparsity / N:M with quantization, reconstruction quality against prune-then-RTN,
the whole-model pipeline, and input validation."""
import pytest
import torch

import prunekit as pk
from prunekit.pruning.sparsegpt import sparsegpt_prune
from prunekit.pruning.stats import LayerStats
from prunekit.quant.quantizer import QuantSpec, find_params, fit_params, quantize, quantize_rtn
from prunekit.quant.sparse_quant import QuantLayerResult, sparsegpt_quant_prune
from prunekit.ref.sparsegpt import reference_fasterprune


from layers import calib_inputs, hessian, layer  # tests/layers.py


# ---- a literal transcription of the reference: fasterprune with a quantizer (GPTQ's groups) ----

def ref_find_params(x, bits, sym):
    """The reference Quantizer.find_params(x, weight=True), per channel; returns [rows, 1] tensors."""
    maxq = torch.tensor(2 ** bits - 1)
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        xmin = -xmax  # prunekit mirrors every group (the reference only those with xmin < 0)
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def ref_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def reference(W, H, spec, *, bits, groupsize=-1, sym=False, **kw):
    """prunekit.ref.sparsegpt's transcription of fasterprune, with the reference quantizer above."""
    maxq = 2 ** bits - 1
    quantizer = (lambda x: ref_find_params(x, bits, sym), lambda x, scale, zero: ref_quantize(x, scale, zero, maxq))
    if isinstance(spec, str) and ":" in spec:
        n, m = map(int, spec.split(":"))
        return reference_fasterprune(W, H, 0, prunen=m - n, prunem=m, quantizer=quantizer, groupsize=groupsize, **kw)
    return reference_fasterprune(W, H, spec, quantizer=quantizer, groupsize=groupsize, **kw)


# (rows, cols, spec, bits, groupsize, sym, blocksize): odd rows; groups straddling blocks; groups
# starting mid-block (read from the block-start weights, as the reference does)
JOINT_CASES = [
    (33, 96, 0.5, 4, -1, False, 128),
    (17, 200, "2:4", 3, 40, False, 128),
    (9, 144, 0.6, 8, 48, True, 32),
    (5, 130, 0.3, 2, 26, False, 32),
    (31, 120, "4:8", 4, 24, True, 64),
    (1, 64, "2:4", 5, 16, False, 128),
]


@pytest.mark.parametrize("rows,cols,spec,bits,groupsize,sym,blocksize", JOINT_CASES)
def test_joint_matches_reference_transcription(rows, cols, spec, bits, groupsize, sym, blocksize):
    W, H = layer(rows, cols, seed=rows)
    result = sparsegpt_quant_prune(W, H, spec, bits=bits, groupsize=groupsize, sym=sym, blocksize=blocksize)
    W_ref, keep_ref, losses_ref = reference(W, H, spec, bits=bits, groupsize=groupsize, sym=sym,
                                            blocksize=blocksize)
    assert isinstance(result, QuantLayerResult)
    assert torch.equal(result.mask, keep_ref)
    torch.testing.assert_close(result.weight, W_ref, rtol=1e-5, atol=1e-5 * float(W_ref.abs().max()))
    assert result.loss_estimate == pytest.approx(float(losses_ref.sum()), rel=1e-4)
    assert not result.weight[~result.mask].any()
    # the result lies on its own grid: codes dequantize back to it
    codes = result.quant.codes(result.weight)
    torch.testing.assert_close(result.quant.dequantize(codes), result.weight, rtol=0, atol=1e-6)


def test_dead_inputs_match_reference():
    W, H = layer(12, 64, seed=3)
    H[5, :] = H[:, 5] = 0
    H[40, :] = H[:, 40] = 0
    result = sparsegpt_quant_prune(W, H, "2:4", bits=4, groupsize=16, name="fc")
    W_ref, keep_ref, _ = reference(W, H, "2:4", bits=4, groupsize=16)
    assert torch.equal(result.mask, keep_ref)
    torch.testing.assert_close(result.weight, W_ref, rtol=1e-5, atol=1e-5 * float(W_ref.abs().max()))
    assert not result.weight[:, [5, 40]].any() and "2 dead input" in result.notes[0]


# ---- the quantizer's grid ----

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
def test_grid_levels_and_exact_zeros(bits, sym):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(13, 96, generator=g) * torch.rand(13, 1, generator=g) * 3
    W[3] = W[3].abs()          # an all-positive row
    W[4, :32] = 0              # an all-zero group
    keep = torch.rand(13, 96, generator=g) > 0.5
    Wq = quantize_rtn(W, bits, 32, keep, sym=sym)
    assert torch.equal(Wq[~keep], torch.zeros(int((~keep).sum())))  # pruned: exactly 0.0
    params = fit_params(W * keep, QuantSpec(bits, 32, sym))
    assert torch.equal(params.zero, params.zero.round())
    assert bool((params.zero >= 0).all()) and bool((params.zero <= 2 ** bits - 1).all())
    assert bool((params.scale > 0).all())
    codes = params.codes(Wq)
    torch.testing.assert_close(params.dequantize(codes), Wq, rtol=0, atol=1e-6)
    levels = Wq.reshape(13, 3, 32)
    for r in range(13):
        for k in range(3):
            assert levels[r, k].unique().numel() <= 2 ** bits
    scale, _ = params.per_column()
    # rounding moves each weight by at most one step (half a step, plus clipping at the grid's ends)
    assert bool(((Wq - W * keep).abs() <= scale * (1 + 1e-5)).all())
    if not sym:  # min-max covers the range: within half a step except possibly at the clipped top
        assert float(((Wq - W * keep).abs() <= scale * (0.5 + 1e-5)).float().mean()) > 0.95


def test_zero_is_exact_for_every_integer_zero_point():
    for bits in range(2, 9):
        maxq = 2 ** bits - 1
        zero = torch.arange(maxq + 1, dtype=torch.float32)
        scale = torch.rand(maxq + 1) * 10 + 1e-3
        assert torch.equal(quantize(torch.zeros(maxq + 1), scale, zero, maxq), torch.zeros(maxq + 1))
        assert torch.equal(quantize(-torch.zeros(maxq + 1), scale, zero, maxq).abs(), torch.zeros(maxq + 1))


def test_find_params_ranges():
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    scale, zero = find_params(x, 2)
    torch.testing.assert_close(scale, torch.tensor([1.0, 2 / 3, 1.0]))   # (xmax - xmin) / 3, 0 included
    assert zero.tolist() == [1.0, 2.0, 0.0]
    scale, zero = find_params(x, 2, sym=True)
    torch.testing.assert_close(scale, torch.tensor([4 / 3, 2 / 3, 2.0]))
    assert zero.tolist() == [2.0, 2.0, 2.0]


# ---- joint pruning + quantization: patterns and quality ----

def test_sparsity_exact_per_block_with_quantization():
    W, H = layer(40, 200, seed=5)
    result = sparsegpt_quant_prune(W, H, 0.6, bits=3, groupsize=50)
    for i1 in range(0, 200, 128):
        block = result.mask[:, i1:i1 + 128]
        assert int((~block).sum()) == int(block.numel() * 0.6)
    assert not result.weight[~result.mask].any()


@pytest.mark.parametrize("spec,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_nm_pattern_exact_with_quantization(spec, n, m):
    W, H = layer(24, 128, seed=7)
    result = sparsegpt_quant_prune(W, H, spec, bits=4, groupsize=32)
    assert torch.equal(result.mask.reshape(24, -1, m).sum(-1), torch.full((24, 128 // m), n))
    assert not result.weight[~result.mask].any()
    assert result.sparsity == pytest.approx(1 - n / m)


def test_joint_beats_prune_then_rtn_beats_magnitude_then_rtn():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g)
    X += 0.1 * torch.randn(512, 128, generator=g)
    W = torch.randn(64, 128, generator=g)
    H = hessian(X)

    def recon_error(Wq):
        return float(((W - Wq) @ X.T).pow(2).sum())

    for spec in ("2:4", 0.5):
        joint = sparsegpt_quant_prune(W, H, spec, bits=3, groupsize=32)
        pruned = sparsegpt_prune(W, H, spec)
        then_rtn = quantize_rtn(pruned.weight, 3, 32, pruned.mask)
        magnitude_rtn = quantize_rtn(W, 3, 32, pk.magnitude_mask(W, spec))
        e_joint, e_then, e_mag = map(recon_error, (joint.weight, then_rtn, magnitude_rtn))
        assert e_joint < 0.9 * e_then < 0.9 * e_mag, (spec, e_joint, e_then, e_mag)


# ---- the pipeline method ----

def test_method_with_quant_prunes_and_quantizes_layer():
    X = calib_inputs(64, seed=9)
    stats = LayerStats(64, hessian=True, name="proj")
    stats.add_batch(X.reshape(4, -1, 64))
    W = torch.randn(16, 64)
    method = pk.SparseGPT("2:4", quant=pk.QuantSpec(bits=4, groupsize=32))
    result = method.prune_layer(W, stats, "proj")
    direct = pk.sparsegpt_quant_prune(W, stats.hessian, "2:4", bits=4, groupsize=32, name="proj")
    assert torch.equal(result.mask, direct.mask) and torch.equal(result.weight, direct.weight)
    assert "quant=QuantSpec(bits=4, groupsize=32" in repr(method)
    bf16 = method.prune_layer(W.bfloat16(), stats, "proj")
    assert bf16.weight.dtype == torch.bfloat16 and not bf16.weight[~bf16.mask].any()
    with pytest.raises(TypeError, match="expected a prunekit.QuantSpec"):
        pk.SparseGPT("2:4", quant=4)


def test_whole_model_sparsegpt_with_quant():
    from pipeline_models import calib_ids, tiny_model

    model = tiny_model("llama")
    spec = pk.QuantSpec(bits=4, groupsize=32)
    report = pk.prune(model, pk.SparseGPT("2:4", quant=spec), calib_ids(), progress=False)
    assert len(report.layers) == 14
    linears = [mod for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}"]
    assert len(linears) == 14
    for lin in linears:
        w = lin.weight.detach()
        rows, cols = w.shape
        nonzero = w.ne(0).reshape(rows, -1, 4).sum(-1)
        assert bool((nonzero <= 2).all())
        groups = w.reshape(rows, cols // 32, 32)
        for r in range(0, rows, 7):
            for k in range(cols // 32):
                assert groups[r, k].unique().numel() <= 16


# ---- bad input ----

def test_bad_input_raises():
    W, H = layer(8, 64)
    for bits in (1, 9, 0, 4.0, True):
        with pytest.raises(ValueError, match="bits: expected an integer in 2..8"):
            pk.QuantSpec(bits=bits)
        with pytest.raises(ValueError, match="bits: expected an integer in 2..8"):
            sparsegpt_quant_prune(W, H, "2:4", bits=bits)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(W, 9)
    for groupsize in (0, -2, 3.5):
        with pytest.raises(ValueError, match="groupsize: expected -1"):
            pk.QuantSpec(bits=4, groupsize=groupsize)
    with pytest.raises(ValueError, match="fc: quantization groupsize 48 does not divide the input width 64"):
        sparsegpt_quant_prune(W, H, 0.5, bits=4, groupsize=48, name="fc")
    with pytest.raises(ValueError, match="does not divide"):
        quantize_rtn(W, 4, 48)
    with pytest.raises(ValueError, match="fc Hessian"):
        sparsegpt_quant_prune(W, H[:32, :32], 0.5, bits=4, name="fc")
    with pytest.raises(TypeError, match="keep_mask must be a bool"):
        quantize_rtn(W, 4, 16, (W > 0).float())
