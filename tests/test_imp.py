"""Iterative magnitude pruning: the sparsity after k rounds, what each rewind mode restores, the report."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.train.imp import prune_remaining


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4))


LAYERS = ("0", "2", "4")


def make_train(steps: int = 4, log: list | None = None):
    """A tiny SGD loop; logs (round, start_step, state at the round's start, state at step 2 of round 0)."""
    def train(model, ctx):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(ctx.index)
        at_2 = None
        for step in range(ctx.start_step, ctx.start_step + steps):
            x = torch.randn(16, 16, generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x[:, :4].sin()).backward()
            opt.step()
            ctx.step()
            if ctx.step_count == 2:
                at_2 = {k: v.clone() for k, v in model.state_dict().items()}
        if log is not None:
            log.append((ctx.index, ctx.start_step, start, at_2,
                        {k: v.clone() for k, v in model.state_dict().items()}))
        with torch.no_grad():
            x = torch.randn(64, 16, generator=torch.Generator().manual_seed(99))
            return {"loss": nn.functional.mse_loss(model(x), x[:, :4].sin()).item(), "sparsity": ctx.sparsity}
    return train


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_imp_reaches_one_minus_one_minus_p_to_the_k(scope):
    model = mlp()
    p, k = 0.2, 4
    result = pk.iterative_magnitude(model, make_train(), rounds=k, fraction=p, scope=scope, progress=False)
    sizes = {name: model.get_submodule(name).weight.numel() for name in LAYERS}
    total = sum(sizes.values())
    kept_global, kept_layer = total, dict(sizes)
    assert len(result.rounds) == k + 1 and result.rounds[0].sparsity == 0.0
    for r in result.rounds[1:]:
        kept_global -= int(p * kept_global)
        kept_layer = {n: c - int(p * c) for n, c in kept_layer.items()}
        expected = kept_global if scope == "global" else sum(kept_layer.values())
        assert r.kept == expected and r.total == total
        assert r.sparsity == pytest.approx(1 - (1 - p) ** r.round, abs=r.round * len(LAYERS) / total)
        assert r.metric["sparsity"] == pytest.approx(r.sparsity)  # what ctx said during the round
    final = result.masks
    assert final.sparsity == pytest.approx(1 - (1 - p) ** k, abs=k * len(LAYERS) / total)
    if scope == "layer":
        assert {n: int(m.sum()) for n, m in final.items()} == kept_layer
    for name, keep in final.items():  # the model ends trained under the final mask
        assert torch.equal(model.get_submodule(name).weight == 0, ~keep)


def test_prune_remaining_drops_the_smallest_kept_weights_and_never_revives():
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    masks = pk.Masks({n: torch.rand(model.get_submodule(n).weight.shape, generator=gen) < 0.5 for n in LAYERS})
    with torch.no_grad():
        model[0].weight[~masks["0"]] = 0.0  # pruned ones zero, as under MaskedTraining ...
        model[0].weight[0, masks["0"][0]] = 0.0  # ... and some kept ones exactly zero: they go first
    new = prune_remaining(model, masks, 0.3, "global")
    kept = {n: model.get_submodule(n).weight.detach()[masks[n]].abs() for n in LAYERS}
    threshold = torch.cat(list(kept.values())).sort().values[int(0.3 * sum(v.numel() for v in kept.values())) - 1]
    for n in LAYERS:
        assert not (new[n] & ~masks[n]).any()             # nothing pruned comes back
        w = model.get_submodule(n).weight.detach().abs()
        assert (w[masks[n] & ~new[n]] <= threshold).all() and (w[new[n]] >= threshold).all()
    assert masks.kept - new.kept == int(0.3 * masks.kept)
    assert not new["0"][0][masks["0"][0]].any()           # the kept zeros were dropped
    per_layer = prune_remaining(model, masks, 0.3, "layer")
    for n in LAYERS:
        assert int(masks[n].sum()) - int(per_layer[n].sum()) == int(0.3 * int(masks[n].sum()))


def _masked(state, masks):
    return {k: v * masks[k[:-7]] if k[:-7] in masks and k.endswith(".weight") else v for k, v in state.items()}


@pytest.mark.parametrize("rewind", ["init", 2, None, "reinit"])
def test_each_round_starts_from_the_rewind_point_under_its_mask(rewind):
    model = mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    log: list = []
    result = pk.iterative_magnitude(model, make_train(log=log), rounds=2, fraction=0.5, rewind=rewind,
                                    reinit_seed=3, progress=False)
    assert result.rewind == {"init": "init", 2: "step 2", None: "none", "reinit": "reinit"}[rewind]
    at_2_round0 = log[0][3]
    for (index, start_step, start, _, _), prev in zip(log[1:], log[:-1]):
        masks = {n: start[f"{n}.weight"] != 0 for n in LAYERS}
        assert result.rounds[index].kept == sum(int(m.sum()) for m in masks.values())
        if rewind == "init":
            expected = _masked(init, masks)
        elif rewind == 2:
            expected = _masked(at_2_round0, masks)
            assert start_step == 2
        elif rewind is None:
            expected = _masked(prev[4], masks)  # the previous round's trained weights, pruned further
        else:
            fresh = mlp()
            pk.reinitialize(fresh, seed=3 + index)
            expected = _masked(fresh.state_dict(), masks)
        if rewind != 2:
            assert start_step == 0
        for key, value in expected.items():
            assert torch.equal(start[key], value), (index, key)


def test_result_table_json_masks_and_plot(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    backend = matplotlib.get_backend()
    model = mlp()
    result = pk.iterative_magnitude(model, make_train(), rounds=2, fraction=0.3, rewind=1, save_dir=tmp_path,
                                    progress=False)
    text = str(result)
    assert "rewind step 1" in text and "loss" in text and text.count("\n") == 5
    loaded = pk.Masks.load(tmp_path / "round_2.safetensors", model)
    assert all(torch.equal(loaded[n], result.masks[n]) for n in LAYERS)
    assert (tmp_path / "imp.json").read_text().count('"round"') == 3
    result.plot(tmp_path / "imp.png")
    assert (tmp_path / "imp.png").read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend  # the caller's backend is left alone
    from prunekit.train.imp import plot_rounds
    plot_rounds({"a": result, "b": result}, tmp_path / "two.png", "loss")
    with pytest.raises(ValueError, match="no metric 'acc'"):
        plot_rounds({"a": result}, tmp_path / "x.png", "acc")


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    result = pk.iterative_magnitude(mlp(), make_train(1), rounds=1, progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"prunekit\[plot\]"):
        result.plot(tmp_path / "x.png")


def test_imp_errors_and_warnings():
    with pytest.raises(ValueError, match="fraction"):
        pk.iterative_magnitude(mlp(), make_train(), rounds=1, fraction=1.0)
    with pytest.raises(ValueError, match="rewind"):
        pk.iterative_magnitude(mlp(), make_train(), rounds=1, rewind="start")
    with pytest.raises(ValueError, match="scope"):
        pk.iterative_magnitude(mlp(), make_train(), rounds=1, scope="row")
    with pytest.raises(ValueError, match="rewind=9: round 0 made only 4 steps"):
        pk.iterative_magnitude(mlp(), make_train(), rounds=1, rewind=9, progress=False)
    with pytest.raises(TypeError, match="round 0: train_fn returned str"):
        pk.iterative_magnitude(mlp(), lambda model, ctx: "good", rounds=1, progress=False)

    def no_step(model, ctx):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
        model(torch.randn(2, 16)).sum().backward()
        opt.step()   # weight decay moves pruned weights; without ctx.step() they are nonzero now
        return 0.0
    model = mlp()
    with pytest.warns(UserWarning, match="round 1: pruned weights of .*ctx.step"):
        result = pk.iterative_magnitude(model, no_step, rounds=1, progress=False)
    assert result.rounds[1].steps == 0
    for name, keep in result.masks.items():  # finalize still left exact zeros
        assert not keep.all() and model.get_submodule(name).weight[~keep].eq(0).all()


def test_from_given_masks_and_exports():
    model = mlp()
    start = pk.Masks({"2": torch.ones(12, 32, dtype=torch.bool)})
    start["2"][:, :16] = False
    result = pk.train.iterative_magnitude(model, make_train(2), rounds=1, fraction=0.5, masks=start,
                                          progress=False)
    assert set(result.masks) == {"2"} and result.rounds[0].sparsity == 0.5
    assert result.rounds[1].kept == 96 and not result.masks["2"][:, :16].any()
    assert pk.train.Masks is pk.Masks and pk.train.rewind is pk.rewind
