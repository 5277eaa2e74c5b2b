"""Rewinding and re-initialization under a mask: survivors get exactly the earlier values, the pruned
weights are exactly zero, and the mask then holds through training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import calibrate

from pipeline_models import calib_ids, tiny_model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(),
                         nn.Linear(12, 4))


def train(model, steps: int, mt=None, seed: int = 0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if mt is not None:
            mt.step()


def test_masks_survive_rewinding_exactly():
    model = mlp()
    init = pk.Snapshot(model)
    train(model, 5)
    at_5 = pk.Snapshot(model, step=5)
    train(model, 10)
    mt = pk.MaskedTraining(model, 0.7)          # prune the trained weights by magnitude
    masks = mt.finalize()
    for snapshot in (init, at_5):
        pk.rewind(model, snapshot, masks)
        state = model.state_dict()
        for name, value in snapshot.state.items():
            layer = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and layer in masks:
                keep = masks[layer]
                assert state[name][~keep].eq(0).all(), name               # zeros where the mask says
                assert torch.equal(state[name][keep], value[keep]), name  # rewound values elsewhere
            else:
                assert torch.equal(state[name], value), name              # biases, LayerNorm: rewound
    mt = pk.MaskedTraining.from_masks(model, masks)  # and retraining keeps the mask
    train(model, 8, mt, seed=1)
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        assert torch.equal(w == 0, ~keep)


def test_snapshot_is_a_copy_and_checks_the_model():
    model = mlp()
    snap = pk.Snapshot(model)
    before = model[0].weight.detach().clone()
    train(model, 2)
    assert torch.equal(snap.state["0.weight"], before) and not torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="missing.*unexpected"):
        snap.restore(nn.Sequential(nn.Linear(16, 4)))
    other = mlp()
    other[5] = nn.Linear(12, 5)
    with pytest.raises(ValueError, match=r"'5.weight' is \(4, 12\)"):
        snap.restore(other)
    with pytest.raises(ValueError, match="step"):
        pk.Snapshot(model, step=-1)


def test_reinitialize_draws_what_the_constructor_draws():
    fresh = mlp(seed=7)                         # reset_parameters in module order = construction order
    model = mlp(seed=0)
    train(model, 3)
    masks = pk.Masks({"3": torch.rand(12, 32, generator=torch.Generator().manual_seed(0)) < 0.5})
    rng = torch.get_rng_state()
    pk.reinitialize(model, masks, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    for name, value in fresh.state_dict().items():
        got = model.state_dict()[name]
        if name == "3.weight":
            assert torch.equal(got, value * masks["3"]), name
        else:
            assert torch.equal(got, value), name


def test_reinitialize_warns_about_parameters_it_cannot_reach():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.full((4,), 3.0))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.warns(UserWarning, match=r"1 parameter.*1\.gain"):
        pk.reinitialize(model, seed=0)
    assert model[1].gain.eq(3.0).all()


def test_reinitialize_a_hf_model_with_its_own_initializer():
    model = tiny_model("llama")
    pk.prune(model, pk.Magnitude("2:4"), calib_ids(2, 8), progress=False)
    masks = pk.Masks.from_model(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)             # far from the initializer's distribution
    pk.reinitialize(model, masks, seed=0)
    std = model.config.initializer_range
    for name, keep in masks.items():
        w = calibrate.layer_weight(model.get_submodule(name)).detach()
        assert torch.equal(w == 0, ~keep), name
        assert w[keep].std().item() == pytest.approx(std, rel=0.25), name
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.eq(1.0).all()  # RMSNorm back to ones
    assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.25)
