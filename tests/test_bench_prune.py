"""bench/bench_prune.py and bench/bench_model.py: they refuse clearly without a GPU, and the per-layer
cases run end to end on a tiny CPU problem (timing replaced by a wall clock)."""
import importlib.util
import pathlib
import time

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wall_time_ms(fn, *, warmup=0, repeats=1):
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return {"ms": ms, "ms_min": ms, "ms_max": ms, "repeats": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("script", ["bench_prune", "bench_model"])
def test_bench_fails_clearly_without_gpu(script, capsys):
    bench = load(script)
    with pytest.raises(SystemExit) as help_exit:
        bench.main(["--help"])
    assert help_exit.value.code == 0
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_sparsegpt_case_matches_reference_on_cpu(pattern, monkeypatch):
    pytest.importorskip("prunekit.ref.sparsegpt")
    bench = load("bench_prune")
    monkeypatch.setattr(bench, "cuda_time_ms", wall_time_ms)
    W, H, _ = bench.make_layer(24, 256, "cpu")
    ours, ref = bench.bench_sparsegpt(W, H, pattern, ref_repeats=1)
    assert ours["provider"] == "prunekit" and ref["provider"] == "reference"
    assert ours["mask_diff"] < 1e-3
    assert abs(ours["rel_err_diff"]) < 1e-3 * ref["rel_err"] + 1e-7
    assert 0 < ref["rel_err"] < 1


def test_wanda_case_matches_reference_on_cpu(monkeypatch):
    pytest.importorskip("prunekit.ref.wanda")
    bench = load("bench_prune")
    monkeypatch.setattr(bench, "cuda_time_ms", wall_time_ms)
    W, H, norms = bench.make_layer(16, 64, "cpu")
    for pattern in ("0.5", "2:4"):
        ours, _ = bench.bench_wanda(W, H, norms, pattern, copy_gbs=100.0)
        assert ours["mask_diff"] == 0.0 and ours["rel_err_diff"] == 0.0
        assert ours["bytes"] == 16 * 64 * 2 + 64 * 4 + 16 * 64


def test_markdown_table_has_a_row_per_result():
    bench = load("bench_prune")
    row = {"op": "wanda_mask", "shape": "8x8", "pattern": "2:4", "provider": "prunekit", "ms": 1.0,
           "ms_min": 0.9, "ms_max": 1.1, "speedup": 3.0, "mask_diff": 0.0, "rel_err": 0.1,
           "rel_err_diff": 0.0, "x_floor": 2.0}
    text = bench.markdown([row, row], {"device": "X", "torch": "t", "commit": "c", "copy_gb_s": 1.0})
    assert text.count("| wanda_mask | 8x8 | 2:4 | prunekit |") == 2
