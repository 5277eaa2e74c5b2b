"""prunekit.prune_filters on small CNN / MLP chains: masking equivalence, shapes, selection, refusals."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.pruning.filters import filter_scores


def conv_net(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-Conv-ReLU-MaxPool-Flatten-Linear-ReLU-Linear with non-trivial BN statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 3 * 3, 10), nn.ReLU(), nn.Linear(10, 5))
    bn = net[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


class FunctionalNet(nn.Module):
    """Functional activations and torch.flatten instead of modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc1 = nn.Linear(6 * 4 * 4, 9)
        self.fc2 = nn.Linear(9, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.flatten(x, 1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(x + torch.relu(self.conv1(x)))


def removed(width: int, kept: list[int]) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def masked_dense(dense: nn.Module, report, consumers: dict[str, tuple[str, int]]) -> nn.Module:
    """The dense model with each removed filter's weights, bias and its consumer's inputs zeroed."""
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for name, kept in report.kept.items():
            layer = masked.get_submodule(name)
            gone = removed(layer.weight.shape[0], kept)
            layer.weight[gone] = 0
            layer.bias[gone] = 0
            consumer, spread = consumers[name]
            columns = (gone[:, None] * spread + torch.arange(spread)).flatten()
            masked.get_submodule(consumer).weight[:, columns] = 0
    return masked


@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_conv_chain_equals_masked_dense(importance):
    dense = conv_net()
    x = torch.randn(2, 3, 8, 8)
    model = copy.deepcopy(dense)
    report = pk.prune_filters(model, 0.25, importance, example_input=x)

    assert report.widths == {"0": (8, 6), "3": (12, 9), "7": (10, 7)}  # 2.5 rounds up
    assert (model[0].weight.shape, model[1].running_mean.shape, model[3].weight.shape) == \
        ((6, 3, 3, 3), (6,), (9, 6, 3, 3))
    assert model[7].weight.shape == (7, 9 * 9) and model[9].weight.shape == (5, 7)
    assert model[1].num_features == 6 and model[3].in_channels == 6 and model[7].in_features == 81
    assert report.params[1] == sum(p.numel() for p in model.parameters()) < report.params[0]

    masked = masked_dense(dense, report, {"0": ("3", 1), "3": ("7", 9), "7": ("9", 1)})
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(x), dense(x), atol=1e-3)  # something was actually removed


def test_selection_matches_reference_norms():
    dense = conv_net(seed=3)
    report = pk.prune_filters(copy.deepcopy(dense), 0.5, "l2", example_input=torch.randn(1, 3, 8, 8))
    for name, kept in report.kept.items():
        w = dense.get_submodule(name).weight.detach().double()
        norms = [math.sqrt(float((w[i] ** 2).sum())) for i in range(w.shape[0])]
        expected = sorted(sorted(range(len(norms)), key=lambda i: -norms[i])[:len(kept)])
        assert kept == expected
        torch.testing.assert_close(filter_scores(w, "l2"), torch.tensor(norms, dtype=torch.float64))


def test_ties_prune_lowest_index_first():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    report = pk.prune_filters(net, 0.5, example_input=torch.randn(3, 4))
    assert report.kept["0"] == [2, 3]


def test_functional_ops_and_torch_flatten():
    dense = FunctionalNet().eval()
    x = torch.randn(3, 2, 6, 6)
    model = copy.deepcopy(dense)
    report = pk.prune_filters(model, 0.3, example_input=x)
    assert report.widths == {"conv": (6, 4), "fc1": (9, 6)}
    masked = masked_dense(dense, report, {"conv": ("fc1", 16), "fc1": ("fc2", 1)})
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


def test_refuses_residual_and_bad_input():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="not a sequential chain"):
        pk.prune_filters(Residual(), 0.25, example_input=x)
    net = conv_net()
    for amount in (-0.1, 1.0):
        with pytest.raises(ValueError, match="amount"):
            pk.prune_filters(net, amount, example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="importance"):
        pk.prune_filters(net, 0.2, "taylor", example_input=torch.randn(1, 3, 8, 8))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="grouped"):
        pk.prune_filters(grouped, 0.25, example_input=x)
    no_flatten = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="flatten"):
        pk.prune_filters(no_flatten, 0.25, example_input=x)
    with pytest.raises(ValueError, match="every output"):
        pk.prune_filters(nn.Sequential(nn.Linear(4, 1), nn.Linear(1, 2)), 0.6, example_input=torch.randn(2, 4))


def flatten_bn1d_net() -> nn.Module:
    """Conv2d -> Flatten -> BatchNorm1d -> Linear: the norm reads the flattened (channel x spatial) columns."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 2 * 2), nn.Linear(16, 3))
    with torch.no_grad():
        net[3].running_mean.uniform_(-1, 1)
        net[3].running_var.uniform_(0.5, 2)
    return net.eval()


def test_batchnorm_after_flatten_is_sliced_by_the_spread_columns():
    dense = flatten_bn1d_net()
    x = torch.randn(3, 2, 4, 4)
    model = copy.deepcopy(dense)
    report = pk.prune_filters(model, 0.5, example_input=x)
    kept = report.kept["0"]
    columns = [c * 4 + s for c in kept for s in range(4)]
    assert model[3].num_features == 8
    torch.testing.assert_close(model[3].running_mean, dense[3].running_mean[columns])
    masked = masked_dense(dense, report, {"0": ("4", 4)})
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


def test_shape_probe_does_not_move_batchnorm_statistics_and_restores_modes():
    model = conv_net()
    model.train()
    model[1].eval()  # a submodule in eval mode must come back in eval mode
    model[7].train()
    before = (model[1].running_mean.clone(), model[1].num_batches_tracked.clone())
    bn2 = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).train()
    stats = (bn2[1].running_mean.clone(), bn2[1].running_var.clone(), bn2[1].num_batches_tracked.clone())
    report = pk.prune_filters(model, 0.25, example_input=torch.randn(4, 3, 8, 8) * 5 + 3)
    kept = report.kept["0"]
    torch.testing.assert_close(model[1].running_mean, before[0][kept])
    assert int(model[1].num_batches_tracked) == int(before[1])
    assert model.training and not model[1].training and model[7].training
    report = pk.prune_filters(bn2, 0.25, example_input=torch.randn(5, 6) * 4 + 2)
    torch.testing.assert_close(bn2[1].running_var, stats[1][report.kept["0"]])
    assert int(bn2[1].num_batches_tracked) == int(stats[2]) and bn2.training and bn2[1].training


def test_percent_amount_printable_report_and_conv1d():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv1d(3, 10, 3), nn.BatchNorm1d(10), nn.ReLU(), nn.MaxPool1d(2),
                          nn.Conv1d(10, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2, 4)).eval()
    x = torch.randn(2, 3, 10)
    model = copy.deepcopy(dense)
    report = pk.prune_filters(model, "30%", example_input=x)
    assert report.widths == {"0": (10, 7), "4": (6, 4)}
    assert model[1].num_features == 7 and model[4].in_channels == 7 and model[7].in_features == 8
    text = str(report)
    assert "0  10 -> 7 outputs" in text and "parameters" in text
    masked = masked_dense(dense, report, {"0": ("4", 1), "4": ("7", 2)})
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="percentage"):
        pk.prune_filters(model, "thirty", example_input=x)


class ViewNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_a_view_is_not_called_a_residual():
    with pytest.raises(ValueError, match="view/reshape") as info:
        pk.prune_filters(ViewNet(), 0.25, example_input=torch.randn(1, 2, 4, 4))
    assert "residual" not in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_is_pruned_where_it_is():
    dense = conv_net().cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    model = copy.deepcopy(dense)
    report = pk.prune_filters(model, 0.25, example_input=x)
    assert all(p.device.type == "cuda" for p in model.parameters())
    masked = masked_dense(dense.cpu(), report, {"0": ("3", 1), "3": ("7", 9), "7": ("9", 1)})
    torch.testing.assert_close(model(x).cpu(), masked(x.cpu()), rtol=1e-4, atol=1e-5)
