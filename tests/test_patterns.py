"""Layer-name patterns: one rule everywhere (shell glob; a regular expression only with `re:`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import calibrate, eval as pk_eval, patterns
from prunekit.pruning.allocation import LayerSparsity


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.fc(x)


class TwelveBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(12))

    def forward(self, x):
        for block in self.model.layers:
            x = block(x)
        return x


def names(model, **kw):
    return set(calibrate.select_layers(model, **kw))


def test_glob_selects_block_1_only_never_10_or_11():
    model = TwelveBlocks()
    kept_dense = names(model) - names(model, exclude="model.layers.1.*")
    assert kept_dense == {"model.layers.1.fc"}
    assert names(model, include="model.layers.1.*") == {"model.layers.1.fc"}
    assert names(model, include="model.layers.1?.*") == {"model.layers.10.fc", "model.layers.11.fc"}


def test_regex_only_with_the_prefix():
    model = TwelveBlocks()
    assert names(model, include=r"re:model\.layers\.1\d\..*") == {"model.layers.10.fc", "model.layers.11.fc"}
    assert names(model, include="re:model.layers.1.*") == {f"model.layers.{i}.fc" for i in (1, 10, 11)}
    assert not patterns.name_matches("model.layers.1.fc", r"model\.layers\.1\.fc")  # a glob, not a regex
    with pytest.raises(ValueError, match="not a valid regular expression"):
        names(model, include="re:model.layers.(")


def test_allocation_rule_reaches_block_1_only():
    model = TwelveBlocks()
    layers = calibrate.select_layers(model)
    chosen = LayerSparsity({"model.layers.1.*": 0.9}).sparsities(0.5, layers)
    assert chosen == {"model.layers.1.fc": 0.9}
    torch.manual_seed(0)
    pk.prune(model, pk.Magnitude(0.5), [{"x": torch.zeros(1, 8)}], progress=False,
             allocation={"model.layers.1.*": 0.75})
    per_layer = pk_eval.sparsity(model).layers
    assert per_layer["model.layers.1.fc"] == pytest.approx(0.75)
    assert per_layer["model.layers.10.fc"] == per_layer["model.layers.11.fc"] == pytest.approx(0.5)


def test_sparsify_uses_the_same_rule():
    model = TwelveBlocks()
    for block in model.model.layers:
        with torch.no_grad():
            block.fc.weight.view(8, 2, 4)[:, :, :2] = 0
    report = pk.sparsify(model, exclude="model.layers.1.*")
    assert set(report.skipped) == {"model.layers.1.fc"} and len(report.swapped) == 11


def test_selected_include_replaces_the_default_and_exclude_removes():
    inc, exc = patterns.as_name_patterns("a.*", "include"), patterns.as_name_patterns(["*.x"], "exclude")
    assert patterns.selected("a.b", inc, [], default=False)       # include picks what the default would not
    assert not patterns.selected("c.b", inc, [], default=True)    # and replaces the default choice
    assert patterns.selected("c.b", [], [], default=True) and not patterns.selected("c.b", [], [], default=False)
    assert not patterns.selected("a.x", inc, exc, default=True)   # exclude wins
    assert not patterns.selected("c.x", [], exc, default=True)
