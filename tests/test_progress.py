"""tqdm bars: shown when asked, and by default only when stderr is a terminal."""
from __future__ import annotations

import io
import sys

import pytest

import prunekit as pk
from prunekit import eval as pk_eval
from prunekit._progress import show_progress

from pipeline_models import calib_ids, tiny_model

pytest.importorskip("transformers")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_default_follows_the_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert show_progress(None) is False and show_progress(True) is True
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(None) is True and show_progress(False) is False


def test_no_bars_in_a_log_by_default(capsys):
    model = tiny_model("llama")
    pk.prune(model, pk.Wanda(0.5), calib_ids(2, 8))
    pk_eval.perplexity(model, calib_ids(2, 8), seq_len=8)
    err = capsys.readouterr().err
    assert "it/s" not in err and "prunekit Wanda" not in err
    pk_eval.perplexity(model, calib_ids(2, 8), seq_len=8, progress=True)
    assert "prunekit perplexity" in capsys.readouterr().err
