"""prunekit.search_allocation: the target met exactly, reproducible, a planted sensitive block found,
cached trials equal to pruning, bad targets refused, history saved and plotted."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401
from torch import nn

import prunekit as pk
from prunekit import calibrate
from prunekit.pipeline import make_method
from prunekit.search.cache import VariantCache
from prunekit.search.space import make_ladder

from pipeline_models import VOCAB, calib_ids, tiny_model

pytest.importorskip("optuna")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Residual(nn.Module):
    """Embedding, residual MLP blocks, returns the last hidden state as a tensor."""

    def __init__(self, n_blocks: int = 4, width: int = 32, sensitive: int | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(n_blocks))
        if sensitive is not None:  # one block carries almost all of the output: pruning it costs the most
            with torch.no_grad():
                for i, block in enumerate(self.blocks):
                    block.fc2.weight.mul_(8.0 if i == sensitive else 0.25)

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        return x


class Flat(nn.Module):
    """No block list: every layer is pruned from whole-model statistics, as the search's cache does."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(VOCAB, width)
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, 48), nn.Linear(48, 40), nn.Linear(40, width)

    def forward(self, input_ids, **kwargs):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(input_ids))))))


def _layers(model):
    found = calibrate.find_blocks(model)
    return calibrate.select_layers(model, None, None, found[0] if found else None)


def _mean_sparsity(result, model):
    layers = _layers(model)
    numel = {n: calibrate.layer_weight(m).numel() for n, m in layers.items()}
    return sum(result.sparsity[n] * k for n, k in numel.items()) / sum(numel.values())


@pytest.mark.parametrize("method,granularity", [("wanda", "block"), ("sparsegpt", "layer")])
def test_meets_target_exactly(method, granularity):
    model = tiny_model("llama")
    ids = calib_ids(16, 16)
    result = pk.search_allocation(model, method, ids, target=0.6, trials=12, batch_size=4, granularity=granularity,
                                  progress=False)
    assert set(result.sparsity) == set(_layers(model))
    assert _mean_sparsity(result, model) == pytest.approx(0.6, abs=1e-12)
    assert len(set(round(s, 9) for s in result.sparsity.values())) > 1  # it did move sparsity between layers
    for trial in result.history["trials"]:
        if trial["state"] == "complete":
            assert trial["sparsity"] == pytest.approx(0.6, abs=1e-12)
    # The search leaves the model dense; pruning with the result realizes the target up to per-row rounding.
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, tiny_model("llama").model.layers[0].mlp.up_proj.weight)
    report = pk.prune(model, make_method(method, 0.6), ids, batch_size=4, allocation=result, progress=False)
    assert not report.warnings
    assert abs(report.sparsity - 0.6) < 1 / 64 + 1e-9  # one column of the narrowest layer
    for row in report.layers:
        assert abs(row.sparsity - result.sparsity[row.name]) < 1 / min(row.shape) + 1e-9


def test_kept_parameters_target():
    model = tiny_model("bert")
    total = sum(calibrate.layer_weight(m).numel() for m in _layers(model).values())
    kept = int(total * 0.45) + 7
    result = pk.search_allocation(model, pk.Wanda(0.5), calib_ids(8, 16), kept=kept, trials=6, batch_size=2,
                                  progress=False)
    assert result.target == pytest.approx(1 - kept / total)
    kept_nominal = sum((1 - result.sparsity[n]) * calibrate.layer_weight(m).numel() for n, m in _layers(model).items())
    assert kept_nominal == pytest.approx(kept, abs=1e-6)


def test_same_seed_same_allocation():
    ids = calib_ids(16, 16)
    runs = [pk.search_allocation(tiny_model("llama"), "wanda", ids, target=0.5, trials=10, seed=seed, batch_size=4,
                                 granularity="layer", progress=False) for seed in (3, 3, 4)]
    assert runs[0].sparsity == runs[1].sparsity
    assert [t["rungs"] for t in runs[0].history["trials"]] == [t["rungs"] for t in runs[1].history["trials"]]
    assert [t["loss"] for t in runs[0].history["trials"]] == [t["loss"] for t in runs[1].history["trials"]]
    assert [t["raw"] for t in runs[0].history["trials"]] != [t["raw"] for t in runs[2].history["trials"]]


@pytest.mark.parametrize("sensitive", [1, 2])
def test_planted_sensitive_block_is_found(sensitive):
    model = Residual(sensitive=sensitive)
    result = pk.search_allocation(model, "wanda", calib_ids(16, 16), target=0.6, trials=40, batch_size=4,
                                  progress=False)
    by_block = {i: result.sparsity[f"blocks.{i}.fc1"] for i in range(4)}
    assert all(result.sparsity[f"blocks.{i}.fc2"] == s for i, s in by_block.items())
    assert by_block[sensitive] == pytest.approx(0.45)  # the lowest rung
    assert all(by_block[i] > by_block[sensitive] for i in by_block if i != sensitive), by_block
    assert result.history["objective"] == "mse"
    assert result.history["best"]["loss"] < 0.7 * result.history["uniform"]["loss"]


@pytest.mark.parametrize("method", [pk.Wanda, pk.SparseGPT])
def test_cached_variants_equal_pruning(method):
    """Without blocks prunekit.prune takes every layer's statistics from dense whole-model forwards, as the
    cache does: the uniform trial's weights are then exactly the pruned model's."""
    model, ids = Flat(), calib_ids(12, 16)
    pruned = copy.deepcopy(model)
    pk.prune(pruned, method(0.5), ids, batch_size=4, progress=False)
    batches = [{"input_ids": chunk} for chunk in ids.split(4)]
    with torch.no_grad():
        cache = VariantCache(model, method(0.5), _layers(model), batches, torch.device("cpu"), make_ladder(0.5))
        cache.assemble({name: 0 for name in _layers(model)})
        for name in ("fc1", "fc2", "fc3"):
            assert torch.equal(getattr(model, name).weight, getattr(pruned, name).weight), name
        cache.restore()
        assert torch.equal(model.fc2.weight, Flat().fc2.weight)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(target=1.0), ValueError, r"fraction in \[0, 1\).*kept="),
    (dict(target=1.5), ValueError, r"fraction in \[0, 1\)"),
    (dict(target=-0.1), ValueError, r"fraction in \[0, 1\)"),
    (dict(target="2:4"), ValueError, "N:M"),
    (dict(target=True), TypeError, "target"),
    (dict(kept=0), ValueError, "unreachable"),
    (dict(kept=10**9), ValueError, "unreachable.*hold"),
    (dict(latency=5.0), ValueError, "latency budgets are not supported"),
    (dict(target=0.5, kept=100), ValueError, "alternatives"),
    (dict(target=0.5, trials=0), ValueError, "trials"),
    (dict(target=0.5, objective="bleu"), ValueError, "objective"),
    (dict(target=0.5, holdout=1.0), ValueError, "holdout"),
    (dict(target=0.5, granularity="row"), ValueError, "granularity"),
    (dict(target=0.5, objective="kl"), ValueError, "logits"),
])
def test_bad_arguments(kwargs, error, match):
    model = tiny_model("bert")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        pk.search_allocation(model, "wanda", calib_ids(8, 16), batch_size=2, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_method_and_calibration():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="N:M"):
        pk.search_allocation(model, pk.Wanda("2:4"), calib_ids(8, 16), batch_size=2)
    with pytest.raises(ValueError, match="method"):
        pk.search_allocation(model, "obs", calib_ids(8, 16), target=0.5)
    with pytest.raises(ValueError, match="at least 2"):
        pk.search_allocation(model, "wanda", calib_ids(2, 16), target=0.5, batch_size=2)
    with pytest.raises(ValueError, match="scope='global'"):
        pk.search_allocation(model, pk.Magnitude(0.5, scope="global"), calib_ids(8, 16), batch_size=2)
    torch.nn.utils.prune.l1_unstructured(model.encoder.layer[0].intermediate.dense, "weight", amount=0.3)
    with pytest.raises(ValueError, match="intermediate.dense.*torch.nn.utils.prune"):
        pk.search_allocation(model, "wanda", calib_ids(8, 16), target=0.5, batch_size=2)


def test_history_json_plot_and_allocation_file(tmp_path):
    model = tiny_model("bert")
    result = pk.search_allocation(model, "sparsegpt", calib_ids(8, 16), target=0.7, trials=5, batch_size=2,
                                  progress=False)
    assert result.history["objective"] == "cosine"  # an encoder: embedding cosine
    assert result.history["uniform"]["quality"] <= result.history["best"]["quality"] <= 1.0
    result.save_history(tmp_path / "history.json")
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["trials"]) == 5 and history["trials"][0]["rungs"] == {g["name"]: 0 for g in history["groups"]}
    result.save(tmp_path / "alloc.json")
    rules = json.loads((tmp_path / "alloc.json").read_text())
    assert rules == result.sparsity and set(rules) == set(_layers(model))
    result.plot(tmp_path / "search.png")
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pk.LayerSparsity(rules).sparsities(0.7, _layers(model)) == result.sparsity
