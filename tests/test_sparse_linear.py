import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.nn.sparse_linear import SparseLinear
from prunekit.nn.swap import sparsify
from prunekit.ref import selection


def prune_24(linear: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        keep = selection.nm_keep_mask(linear.weight.abs().float(), 2, 4)
        linear.weight.mul_(keep)
    return linear


def make_linear(out_f, in_f, bias, dtype, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return prune_24(nn.Linear(in_f, out_f, bias=bias)).to(dtype)


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(24, 32), (40, 72), (7, 8)])
@pytest.mark.parametrize("lead", [(1,), (3,), (17,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_masked_dense(dtype, tol, shape, lead, bias, gen):
    linear = make_linear(*shape, bias, dtype, gen)
    sparse = SparseLinear.from_dense(linear)
    x = torch.randn(*lead, shape[1], generator=gen).to(dtype)
    expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    y = sparse(x)
    assert y.shape == (*lead, shape[0]) and y.dtype == dtype
    assert rel_err(y, expected) < tol
    assert torch.equal(sparse.weight, linear.weight)


def test_to_dense_round_trip(gen):
    linear = make_linear(16, 32, True, torch.float32, gen)
    back = SparseLinear.from_dense(linear).to_dense()
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)


def test_from_dense_names_first_offending_group():
    linear = nn.Linear(16, 4)
    with pytest.raises(ValueError, match=r"proj\.weight is not 2:4 sparse: row 0, group 0"):
        SparseLinear.from_dense(linear, name="proj")


def test_backward_matches_masked_dense(gen):
    linear = make_linear(12, 16, True, torch.float32, gen)
    sparse = SparseLinear.from_dense(linear)
    assert sparse.values.requires_grad and sparse.bias.requires_grad
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 5, 12, generator=gen)
    sparse(x).backward(grad)
    linear(x_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(sparse.bias.grad, linear.bias.grad)
    # the kept values receive exactly the dense gradient at their positions
    from prunekit.ref.pack24 import kept_positions
    kept = kept_positions(linear.weight.detach())
    torch.testing.assert_close(sparse.values.grad.reshape(-1), linear.weight.grad[kept].reshape(-1))


def test_frozen_by_default_when_packed(gen):
    linear = make_linear(8, 16, False, torch.float32, gen).requires_grad_(False)
    sparse = SparseLinear.from_dense(linear)
    assert not sparse.values.requires_grad and not any(p.requires_grad for p in sparse.parameters())


def test_opcheck(gen):
    linear = make_linear(12, 24, True, torch.float32, gen)
    s = SparseLinear.from_dense(linear)
    x = torch.randn(3, 24, generator=gen)
    torch.library.opcheck(torch.ops.prunekit.sparse24_linear, (x, s.values.detach(), s.meta, s.bias.detach()))
    torch.library.opcheck(torch.ops.prunekit.sparse24_linear, (x, s.values.detach(), s.meta, None))
    torch.library.opcheck(torch.ops.prunekit.sparse24_linear,
                          (x.requires_grad_(True), s.values.detach().requires_grad_(True), s.meta, None))


def test_input_errors(gen):
    s = SparseLinear.from_dense(make_linear(8, 16, False, torch.float32, gen))
    with pytest.raises(ValueError, match="last dimension 16"):
        s(torch.zeros(2, 8))
    with pytest.raises(TypeError, match="dtype"):
        s(torch.zeros(2, 16, dtype=torch.float16))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.head = nn.Linear(32, 12)  # width 12 would pass, but it stays dense (not pruned)
        self.odd = nn.Linear(12, 8)    # in_features not divisible by 8

    def forward(self, x):
        return self.odd(self.head(self.down(torch.relu(self.up(x)))))


def test_sparsify_small_mlp(gen):
    torch.manual_seed(0)
    model = MLP()
    prune_24(model.up)
    prune_24(model.down)
    x = torch.randn(5, 32, generator=gen)
    with torch.no_grad():
        expected = model(x)
    report = sparsify(model)
    assert report.swapped == ["up", "down"]
    assert report.skipped["head"].startswith("not 2:4: row 0, group")
    assert "not divisible by 8" in report.skipped["odd"]
    assert isinstance(model.up, SparseLinear) and isinstance(model.head, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert "swapped  up" in str(report)


def test_sparsify_include_exclude_and_tied(gen):
    model = nn.Sequential(prune_24(nn.Linear(16, 16)), prune_24(nn.Linear(16, 16)), prune_24(nn.Linear(16, 16)))
    model[2].weight = model[1].weight  # tied
    report = sparsify(model, include=["0", "1", "2"], exclude="0")
    assert report.swapped == []
    assert report.skipped["0"] == "matched by exclude"
    assert "tied" in report.skipped["1"] and "tied" in report.skipped["2"]
    assert sparsify(model, include="0").swapped == ["0"]


def test_torch_compile_fullgraph(gen):
    model = nn.Sequential(prune_24(nn.Linear(32, 24)), nn.GELU(), prune_24(nn.Linear(24, 16, bias=False)))
    sparsify(model)
    model.requires_grad_(False)
    x = torch.randn(3, 32, generator=gen)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    torch.testing.assert_close(compiled(torch.randn(7, 32, generator=gen)).shape, torch.Size([7, 16]))


def test_from_packed_validates_metadata():
    values = torch.zeros(2, 8)
    meta = torch.full((2, 2), 0x44, dtype=torch.uint8)
    meta[0, 0] = 0x40  # group 0 nibble 0x0
    with pytest.raises(ValueError, match=r"nibble 0x0 at row 0, group 0"):
        SparseLinear.from_packed(values, meta)
