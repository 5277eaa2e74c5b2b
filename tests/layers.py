"""Seeded single-layer problems shared by the SparseGPT tests: a weight and the Hessian of inputs whose
features are correlated, as real activations are."""
import torch


def calib_inputs(cols, samples=None, seed=0, mix=0.3):
    g = torch.Generator().manual_seed(seed)
    samples = samples or 2 * cols
    A = torch.eye(cols) + mix * torch.randn(cols, cols, generator=g) / cols ** 0.5
    return torch.randn(samples, cols, generator=g) @ A


def hessian(X):
    return 2 / X.shape[0] * X.T @ X


def layer(rows, cols, seed=0, **kw):
    X = calib_inputs(cols, seed=seed, **kw)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100))
    return W, hessian(X)
