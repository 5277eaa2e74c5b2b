"""Masks as values: taken from a pruned model or its report, saved and loaded exactly, and held by
MaskedTraining.from_masks for any pattern (N:M included)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

import prunekit as pk
from prunekit import calibrate
from prunekit.train.masks import META_KEY

from pipeline_models import calib_ids, tiny_model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4))


def random_masks(model, seed: int = 0, keep: float = 0.6) -> pk.Masks:
    gen = torch.Generator().manual_seed(seed)
    return pk.Masks({name: torch.rand(calibrate.layer_weight(m).shape, generator=gen) < keep
                     for name, m in model.named_modules() if calibrate.is_prunable(m)})


def nm_masks(model, n: int, m: int, seed: int = 0) -> pk.Masks:
    """Random N:M keep masks: n kept positions drawn per group of m inputs (layers whose width m divides)."""
    gen = torch.Generator().manual_seed(seed)
    out = pk.Masks()
    for name, module in model.named_modules():
        if calibrate.is_prunable(module):
            rows, cols = calibrate.layer_weight(module).shape
            if cols % m:
                continue
            order = torch.rand(rows, cols // m, m, generator=gen).argsort(-1)
            out[name] = (order < n).reshape(rows, cols)
    return out


def train(model, mt, steps: int, seed: int = 0, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        mt.step()


def test_from_model_and_from_report_read_the_pruned_zeros():
    model = tiny_model("llama")
    report = pk.prune(model, pk.Wanda("2:4"), calib_ids(4, 16), progress=False, batch_size=2)
    weights = {layer.name: calibrate.layer_weight(model.get_submodule(layer.name)).detach()
               for layer in report.layers}
    for masks in (pk.Masks.from_model(model), pk.Masks.from_model(model, report)):
        assert set(masks) == set(weights)
        for name, keep in masks.items():
            assert torch.equal(keep, weights[name] != 0), name
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert masks.sparsity == pytest.approx(0.5)


def test_from_report_checks_names_and_shapes(tmp_path):
    model = tiny_model("llama")
    report = pk.prune(model, pk.Magnitude(0.5), calib_ids(2, 8), progress=False)
    report.to_json(tmp_path / "report.json")
    assert set(pk.Masks.from_model(model, tmp_path / "report.json")) == {layer.name for layer in report.layers}
    report.layers[0].shape = (3, 5)
    with pytest.raises(ValueError, match=rf"{report.layers[0].name}.*\(3, 5\)"):
        pk.Masks.from_model(model, report)
    report.layers[0].name = "model.layers.0.nope"
    with pytest.raises(ValueError, match="model.layers.0.nope.*no such module"):
        pk.Masks.from_model(model, report)


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    model = mlp() if kind == "mlp" else tiny_model("gpt2")  # widths 16/32/12 (not whole bytes), Conv1D
    masks = random_masks(model)
    masks["0" if kind == "mlp" else "transformer.h.0.attn.c_attn"][:] = True    # all kept
    masks["2" if kind == "mlp" else "transformer.h.1.mlp.c_proj"][:] = False    # all pruned
    path = masks.save(tmp_path / "m.safetensors")
    loaded = pk.Masks.load(path, model)
    assert isinstance(loaded, pk.Masks) and set(loaded) == set(masks)
    for name in masks:
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], masks[name]), name
    assert loaded.sparsity == masks.sparsity
    with open(path, "rb") as f:
        assert b"pickle" not in f.read(64)  # a safetensors header, not a pickle stream
    assert path.stat().st_size < masks.total // 8 + 4096  # bit-packed


def _rewrite(path, tensors, header):
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(header)} if header is not None else None)


def test_bad_mask_files_raise_clear_errors(tmp_path):
    model = mlp()
    masks = random_masks(model)
    good = masks.save(tmp_path / "good.safetensors")
    with pytest.raises(FileNotFoundError, match="no such mask file"):
        pk.Masks.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        pk.Masks.load(tmp_path / "junk")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        pk.Masks.load(truncated)

    from safetensors import safe_open
    with safe_open(str(good), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()[META_KEY])
    bad = tmp_path / "bad.safetensors"
    _rewrite(bad, tensors, None)
    with pytest.raises(ValueError, match="not a mask file"):
        pk.Masks.load(bad)
    _rewrite(bad, tensors, {**header, "version": 99})
    with pytest.raises(ValueError, match="version 99"):
        pk.Masks.load(bad)
    altered = {k: v.copy() for k, v in tensors.items()}
    altered["2"][0, 0] ^= 0xFF
    _rewrite(bad, altered, header)
    with pytest.raises(ValueError, match="'2'.*altered or corrupted"):
        pk.Masks.load(bad)
    _rewrite(bad, {**tensors, "4": tensors["4"][:, :1].copy()}, header)
    with pytest.raises(ValueError, match="'4' is stored as uint8 \\(4, 1\\)"):
        pk.Masks.load(bad)
    _rewrite(bad, {k: v for k, v in tensors.items() if k != "0"}, header)
    with pytest.raises(ValueError, match=r"missing \['0'\]"):
        pk.Masks.load(bad)

    other = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"mask '2' is \(12, 32\) but the layer's weight is \(8, 32\)"):
        pk.Masks.load(good, other)
    with pytest.raises(ValueError, match="'1'.*ReLU, not a linear layer"):
        pk.Masks({"1": torch.ones(2, 2, dtype=torch.bool)}).check(model)
    with pytest.raises(ValueError, match="'9'.*no such module"):
        pk.Masks({"9": torch.ones(4, 4, dtype=torch.bool)}).check(model)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_masks_stay_nm_through_training(nm):
    n, m = nm
    model = mlp(1)
    masks = nm_masks(model, n, m, seed=n + m)
    assert set(masks) == ({"0", "2", "4"} if m == 4 else {"0", "2"})
    mt = pk.MaskedTraining.from_masks(model, masks)
    assert mt.sparsity == pytest.approx(1 - n / m)
    before = {name: mt.layers[name].weight.detach().clone() for name in masks}
    train(model, mt, 12)
    for name, keep in masks.items():
        w = mt.layers[name].weight.detach()
        assert torch.equal(w == 0, ~keep), name                    # zeros exactly where the mask says
        kept_per_group = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (kept_per_group == n).all(), name                   # still exactly N:M
        assert not torch.equal(w, before[name])                    # and the kept weights trained
    assert all(torch.equal(mt.masks[name], keep) for name, keep in masks.items())
    lin = pk.SparseLinear.from_dense(model[0]) if nm == (2, 4) else None  # a real 2:4 weight
    assert lin is None or torch.allclose(lin(torch.ones(3, 16)), model[0](torch.ones(3, 16)), atol=1e-5)


def test_from_masks_holds_any_pattern_on_a_subset_of_layers():
    model = mlp()
    rows = torch.ones(32, 16, dtype=torch.bool)
    rows[::3] = False                                   # structured: whole output rows
    mt = pk.MaskedTraining.from_masks(model, {"0": rows})  # a plain dict works too
    assert set(mt.layers) == {"0"} and mt.sparsity == pytest.approx(11 / 32)
    dense_before = model[2].weight.detach().clone()
    train(model, mt, 5)
    assert model[0].weight[::3].eq(0).all() and model[0].weight[1::3].ne(0).all()
    assert not torch.equal(model[2].weight, dense_before)  # other layers train freely
    with pytest.raises(RuntimeError, match="fixed"):
        mt.update_masks()


def test_from_masks_errors_name_the_layer():
    model = mlp()
    with pytest.raises(TypeError, match="mask '0'.*bool"):
        pk.MaskedTraining.from_masks(model, {"0": torch.ones(32, 16)})
    with pytest.raises(ValueError, match=r"mask '2' is \(32, 12\)"):
        pk.MaskedTraining.from_masks(model, {"2": torch.ones(32, 12, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no masks"):
        pk.MaskedTraining.from_masks(model, {})
    with pytest.raises(ValueError, match="zero weights"):
        pk.Masks.from_model(model)


def test_masked_training_masks_are_masks_values(tmp_path):
    model = tiny_model("gpt2")
    mt = pk.MaskedTraining(model, "2:4")
    masks = mt.finalize()
    assert isinstance(masks, pk.Masks) and masks.sparsity == pytest.approx(0.5)
    fresh = tiny_model("gpt2", seed=1)
    mt2 = pk.MaskedTraining.from_masks(fresh, pk.Masks.load(masks.save(tmp_path / "m.safetensors"), fresh))
    for name, keep in masks.items():  # Conv1D: masks in [out, in], the weight stored [in, out]
        assert torch.equal(calibrate.layer_weight(mt2.layers[name]) != 0, keep)
    assert np.isclose(pk.Masks.from_model(fresh).sparsity, 0.5)
