"""MaskedTraining: masks hold exactly through optimizer steps, gradual schedules reach their target."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import calibrate

from pipeline_models import calib_ids, tiny_model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4))


def train_step(model, opt, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def zeros(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_masks_survive_adam_with_momentum_exactly(pattern):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):  # momentum built up while dense
        train_step(model, opt, step)
    layers = {"0": model[0], "2": model[2], "4": model[4]}
    mt = pk.MaskedTraining(model, pattern)
    keep = mt.masks
    assert set(keep) == {"0", "2", "4"}
    moved = False
    for step in range(3, 15):
        train_step(model, opt, step)
        moved |= any(bool(layers[n].weight[~k].ne(0).any()) for n, k in keep.items())
        mt.step()
        for name, k in keep.items():
            w = layers[name].weight.detach()
            assert torch.equal(w == 0, ~k), name     # pruned exactly zero, kept weights still alive
    assert moved  # without mt.step() the stale Adam moments would have revived pruned weights
    for name, k in keep.items():
        if pattern == "2:4":
            assert (k.reshape(k.shape[0], -1, 4).sum(-1) == 2).all()
        else:
            assert int((~k).sum()) == k.numel() // 2
        assert torch.equal(mt.masks[name], k)    # fixed pattern: updates only at schedule steps


def test_gradients_of_pruned_weights_are_zero():
    model = mlp()
    mt = pk.MaskedTraining(model, 0.75)
    nn.functional.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 4)).backward()
    for name, keep in mt.masks.items():
        grad = model.get_submodule(name).weight.grad
        assert grad[~keep].eq(0).all() and grad[keep].ne(0).any()


@pytest.mark.parametrize("method", [None, pk.Magnitude(0.75, scope="row"), pk.Magnitude(0.75, scope="global")])
def test_gradual_cubic_schedule_reaches_the_target_exactly(method):
    model = mlp()
    schedule = pk.cubic_schedule(0.75, begin=2, end=14, every=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mt = pk.MaskedTraining(model, method, schedule)
    total = sum(m.weight.numel() for m in mt.layers.values())
    previous = zeros(model)
    for step in range(1, 20):
        train_step(model, opt, step)
        mt.step()
        now = zeros(model)
        s = schedule(step)
        assert mt.sparsity == pytest.approx(s)
        if method is None:  # Magnitude per layer: exactly int(numel * s) per layer
            assert all(int(z.sum()) == int(z.numel() * s) for z in now.values())
        elif method.scope == "row":
            assert all((z.sum(1) == int(z.shape[1] * s)).all() for z in now.values())
        else:
            assert sum(int(z.sum()) for z in now.values()) == int(total * s)
        assert all(bool((previous[n] <= now[n]).all()) for n in now)  # once pruned, pruned for good
        previous = now
    assert mt.sparsity == 0.75 and mt.step_count == 19


def test_nm_masks_are_recomputed_per_group_on_a_conv1d_model():
    model = tiny_model("gpt2")  # Conv1D layers keep their weight as [in, out]
    schedule = pk.constant_schedule(0.5, begin=1, every=2, end=3)
    mt = pk.MaskedTraining(model, "2:4", schedule)
    assert all(bool(m.all()) for m in mt.masks.values())  # dense until begin
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = calib_ids(2, 8)
    for step in range(4):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        mt.step()
        for name, keep in mt.masks.items():
            w = calibrate.layer_weight(mt.layers[name]).detach()
            assert keep.shape == w.shape
            assert (keep.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()  # N:M along in_features
            assert (w[~keep] == 0).all()
    masks = mt.finalize()
    assert len(masks) == 8


def test_finalize_hard_zeros_and_removes_hooks():
    model = mlp()
    mt = pk.MaskedTraining(model, 0.5)
    with torch.no_grad():
        for m in mt.layers.values():
            m.weight.add_(1.0)  # disturb the zeros; finalize must restore them
    masks = mt.finalize()
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        assert w[~keep].eq(0).all()
    nn.functional.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 4)).backward()
    assert any(bool(model.get_submodule(n).weight.grad[~k].ne(0).any()) for n, k in masks.items())
    with pytest.raises(RuntimeError, match="finalize"):
        mt.step()


def test_from_pruned_keeps_the_one_shot_pattern_fixed():
    model = tiny_model("llama")
    pk.prune(model, pk.Wanda("2:4"), calib_ids(4, 16), progress=False, batch_size=2)
    before = {n: calibrate.layer_weight(m).detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and ".layers." in n}
    mt = pk.MaskedTraining.from_pruned(model)
    assert set(mt.layers) == set(before) and mt.sparsity == pytest.approx(0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = calib_ids(2, 16, seed=1)
    for _ in range(4):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        mt.step()
    mt.finalize()
    for name, w0 in before.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(w == 0, w0 == 0), name
        assert not torch.equal(w, w0)  # the kept weights did train
    with pytest.raises(RuntimeError, match="fixed"):
        pk.MaskedTraining.from_pruned(model).update_masks()


def test_errors():
    with pytest.raises(ValueError, match="calibration statistics"):
        pk.MaskedTraining(mlp(), pk.Wanda(0.5))
    with pytest.raises(ValueError, match="agree"):
        pk.MaskedTraining(mlp(), 0.5, pk.cubic_schedule(0.8, end=10, every=5))
    with pytest.raises(ValueError, match="N:M"):
        pk.MaskedTraining(mlp(), "2:4", pk.cubic_schedule(0.5, end=10, every=5), include=["0"])
    with pytest.raises(ValueError, match="divisible"):
        pk.MaskedTraining(mlp(), "2:8")  # the last layer has 12 inputs
    with pytest.raises(ValueError, match="no(ne)? .*zero weights"):
        pk.MaskedTraining.from_pruned(mlp())
    with pytest.raises(ValueError, match="pattern"):
        pk.MaskedTraining(mlp())
    with pytest.raises(TypeError, match="schedule"):
        pk.MaskedTraining(mlp(), 0.5, lambda t: 0.5)


def test_masks_follow_the_model_to_another_device():
    model = tiny_model("llama")
    mt = pk.MaskedTraining(model, 0.5)
    model.to("meta")  # a device move without an accelerator: the masks must go along
    mt.apply()
    assert {mask.device.type for mask in mt.masks.values()} == {"meta"}


@pytest.mark.gpu
def test_masks_follow_the_model_to_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_model("llama")
    mt = pk.MaskedTraining(model, "2:4")
    model.cuda()
    loss = model(input_ids=calib_ids(2, 8).cuda()).logits.float().pow(2).mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    mt.step()
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.is_cuda and ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
