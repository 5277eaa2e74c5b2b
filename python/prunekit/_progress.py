"""When long work shows a tqdm bar: when asked, or by default only on a terminal."""
from __future__ import annotations

import sys


def show_progress(progress: bool | None) -> bool:
    """`progress` if given; None means: only when stderr is a terminal (no bars in logs and CI)."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())
