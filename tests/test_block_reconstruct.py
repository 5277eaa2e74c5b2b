"""BlockReconstruct (prunekit.pruning.block_reconstruct): lowers the block output error it minimizes, keeps
every layer's mask exactly, is deterministic under prune's seed, and refuses what it cannot do."""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit as pk
from prunekit import calibrate
from prunekit.pruning.block_reconstruct import BlockReconstruct

pytest.importorskip("transformers")
from pipeline_models import BLOCK_PATH, calib_ids, tiny_model  # noqa: E402


def weights(model, report):
    modules = dict(model.named_modules())
    return {row.name: calibrate.layer_weight(modules[row.name]).detach().clone() for row in report.layers}


def block_records(report):
    return [r for row in report.layers for r in row.refine if r["step"].startswith("BlockReconstruct")]


def test_one_block_lowers_its_output_error_and_keeps_the_masks():
    """Direct call on block 0 of a pruned tiny Llama: the error it reports is the one recomputed here,
    it falls, and every weight outside the masks stays exactly zero."""
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    batches = [{"input_ids": b} for b in calib_ids(8, 16).split(4)]
    inputs = calibrate.capture_block_inputs(model, model.model.layers, batches, torch.device("cpu"), last=0)
    block = model.model.layers[0]
    with torch.no_grad():
        wanted = [inp.call(dense.model.layers[0], 0) for inp in inputs]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    masks = {}
    for name, m in layers.items():
        masks[name] = pk.magnitude_mask(m.weight.detach(), "2:4")
        with torch.no_grad():
            m.weight.mul_(masks[name])

    def error():
        with torch.no_grad():
            return sum(float((inp.call(block, 0) - w).pow(2).sum()) for inp, w in zip(inputs, wanted))

    before = error()
    torch.manual_seed(0)
    with torch.no_grad():  # as inside prunekit.prune
        record = BlockReconstruct(steps=20, lr=1e-3).reconstruct(block, 0, layers, masks, inputs, wanted)
    after = error()
    assert record["error_before"] == pytest.approx(before, rel=1e-5)
    assert record["error_after"] == pytest.approx(after, rel=1e-5)
    assert after < 0.7 * before and record["reverted"] == 0
    for name, m in layers.items():
        assert not bool(m.weight.ne(0).logical_and(~masks[name]).any()), name
        assert m.weight.grad is None and m.weight.requires_grad  # flags restored, no .grad left behind
    assert all(p.grad is None for p in dense.parameters())


def test_a_step_that_makes_the_block_worse_is_undone():
    model = tiny_model("llama")
    batches = [{"input_ids": b} for b in calib_ids(8, 16).split(4)]
    inputs = calibrate.capture_block_inputs(model, model.model.layers, batches, torch.device("cpu"), last=0)
    block = model.model.layers[0]
    with torch.no_grad():
        wanted = [inp.call(block, 0) for inp in inputs]  # the dense block itself: error 0, nothing to gain
    layers = {"mlp.up_proj": block.mlp.up_proj}
    saved = block.mlp.up_proj.weight.detach().clone()
    with torch.no_grad():
        record = BlockReconstruct(steps=3, lr=0.1).reconstruct(
            block, 0, layers, {"mlp.up_proj": torch.ones_like(saved, dtype=torch.bool)}, inputs, wanted)
    assert record["reverted"] == 1 and record["error_after"] == record["error_before"] == 0
    assert torch.equal(block.mlp.up_proj.weight, saved)


@pytest.mark.parametrize("kind,pattern,target", [("llama", "2:4", "dense"), ("gpt2", "0.5", "local"),
                                                  ("bert", "2:4", "dense")])
def test_prune_with_block_reconstruct(kind, pattern, target):
    """Through prunekit.prune: every block's error falls, the pattern is exact (GPT-2's Conv1D too), and the
    same seed gives the same weights."""
    method = pk.SparseGPT(pattern)
    model = tiny_model(kind)
    step = BlockReconstruct(steps=12, lr=1e-3, target=target)
    report = pk.prune(model, method, calib_ids(), progress=False, batch_size=4, refine=[step])
    assert "BlockReconstruct" in report.method and "refine BlockReconstruct" in str(report)
    records = block_records(report)
    assert len(records) == 2  # one per block, kept with the block's first layer
    assert all(r["error_after"] < r["error_before"] for r in records)
    got = weights(model, report)
    for name, w in got.items():
        if pattern == "2:4":
            assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), name
        else:
            assert float(w.eq(0).float().mean()) >= 0.5 - 1e-9, name
    # the report's layer errors are those of the final (reconstructed) weights, not the method's
    plain = tiny_model(kind)
    base = pk.prune(plain, method, calib_ids(), progress=False, batch_size=4)
    assert report.layers[0].error != base.layers[0].error
    again = tiny_model(kind)
    pk.prune(again, method, calib_ids(), progress=False, batch_size=4, refine=[step])
    for (k, v), (_, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, v2), k


def test_block_reconstruct_keeps_layer_steps_masks():
    """After DSnoT + LeastSquares, the block step keeps the refined mask: its zeros are the zeros the layer
    steps left in block 0 (block 0 sees the same inputs with or without the block step)."""
    method = pk.Wanda("2:4")
    layer_only = tiny_model("llama")
    r1 = pk.prune(layer_only, method, calib_ids(), progress=False, batch_size=4, refine=[pk.DSnoT(), pk.LeastSquares()])
    both = tiny_model("llama")
    r2 = pk.prune(both, method, calib_ids(), progress=False, batch_size=4,
                  refine=[pk.DSnoT(), pk.LeastSquares(), BlockReconstruct(steps=8, lr=1e-3)])
    w1, w2 = weights(layer_only, r1), weights(both, r2)
    first = f"{BLOCK_PATH['llama']}.0."
    for name in w1:
        if name.startswith(first):
            assert torch.equal(w1[name] != 0, w2[name] != 0) and not torch.equal(w1[name], w2[name]), name


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="put it last"):
        pk.prune(model, pk.Wanda(0.5), calib_ids(), progress=False, refine=[BlockReconstruct(), pk.LeastSquares()])
    with pytest.raises(ValueError, match="at most one BlockReconstruct"):
        pk.prune(model, pk.Wanda(0.5), calib_ids(), progress=False, refine=[BlockReconstruct(), BlockReconstruct()])
    with pytest.raises(ValueError, match="undo the quantization"):
        pk.prune(model, pk.SparseGPT(0.5, quant=pk.QuantSpec(bits=4)), calib_ids(), progress=False,
                 refine=BlockReconstruct())
    with pytest.raises(ValueError, match="steps"):
        BlockReconstruct(steps=-1)
    with pytest.raises(ValueError, match="lr"):
        BlockReconstruct(lr=0)
    with pytest.raises(ValueError, match="target"):
        BlockReconstruct(target="final")
    flat = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="no block list"):
        pk.prune(flat, pk.Wanda(0.5), torch.randint(0, 16, (4, 8)), progress=False, refine=BlockReconstruct())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model("llama").state_dict().values()))
