"""`python -m prunekit ...` (and `torchrun --nproc_per_node=N -m prunekit prune ...`): the prunekit command."""
import sys

from .cli import main

sys.exit(main())
