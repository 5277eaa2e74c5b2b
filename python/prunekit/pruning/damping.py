"""The damping ladder shared by every step that factors a (damped) Hessian: SparseGPT's inverse-Hessian
factor and the least-squares refinement. First the caller's percdamp in float32 (the reference's choice),
then float64, then float64 with the damping x10 per step up to MAX_PERCDAMP (x mean(diag(H)))."""
from __future__ import annotations

import torch

MAX_PERCDAMP = 10.0


def damping_ladder(percdamp: float) -> list[tuple[float, torch.dtype]]:
    """(percdamp, dtype) pairs to try in order until a factorization succeeds."""
    attempts = [(percdamp, torch.float32), (percdamp, torch.float64)]
    p = max(percdamp, 1e-3)
    while p < MAX_PERCDAMP:
        p = min(p * 10, MAX_PERCDAMP)
        attempts.append((p, torch.float64))
    return attempts
