"""PruneReport files: never touching process-wide state (umask, matplotlib backend)."""
from __future__ import annotations

import os
import stat

import pytest

from prunekit.report import LayerReport, PruneReport


def report():
    return PruneReport("Magnitude(0.5)", "0.5", [LayerReport("a", (4, 8), "0.5", 0.5, 1.0, 0.01)])


def test_to_json_leaves_the_umask_alone_and_gives_a_normal_mode(tmp_path, monkeypatch):
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    old = real(0o027)
    try:
        report().to_json(tmp_path / "r.json")
    finally:
        real(old)
    assert calls == []  # os.umask is process-wide: setting it, even briefly, races other threads
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o640
    assert PruneReport.from_json(tmp_path / "r.json").layers == report().layers
    assert os.listdir(tmp_path) == ["r.json"]


def test_plot_keeps_the_callers_backend(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        report().plot(tmp_path / "r.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
