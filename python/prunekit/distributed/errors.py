"""The error every rank raises when a distributed pruning run cannot go on."""
from __future__ import annotations


class DistributedError(RuntimeError):
    """A rank of a distributed run failed or stopped answering. Raised on every rank: the failing
    rank's own exception is chained (`__cause__`); the others name the failing rank and its error."""
