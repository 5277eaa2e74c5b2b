"""bench/bench_prune.py: the per-layer cases run end to end on a tiny CPU problem (CUDA-event timing
replaced by a wall clock) and give rows in the shared schema. The no-GPU exit of every bench script is
checked in tests/test_bench_kit.py."""
import importlib.util
import pathlib
import time

import pytest

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
    return {"time_ms": ms, "p10_ms": ms, "p90_ms": ms, "samples": 1}


RUN = {"device": "cpu", "commit": "test"}


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_sparsegpt_case_matches_reference_on_cpu(pattern, monkeypatch):
    pytest.importorskip("prunekit.ref.sparsegpt")
    bench = load("bench_prune")
    monkeypatch.setattr(bench.common, "time_once_ms", wall_time_ms)
    W, H, _ = bench.make_layer(24, 256, "cpu")
    ours, ref = bench.bench_sparsegpt(RUN, W, H, pattern, ref_repeats=1)
    assert ours["provider"] == "prunekit" and ref["provider"] == "reference"
    assert ours["shape"] == "24x256" and ours["dtype"] == "bfloat16" and ours["device"] == "cpu"
    ours, ref = ours["extras"], ref["extras"]
    assert ours["pattern"] == pattern
    assert ours["mask_diff"] < 1e-3
    assert abs(ours["rel_err_diff"]) < 1e-3 * ref["rel_err"] + 1e-7
    assert 0 < ref["rel_err"] < 1


def test_wanda_case_matches_reference_on_cpu(monkeypatch):
    pytest.importorskip("prunekit.ref.wanda")
    bench = load("bench_prune")
    monkeypatch.setattr(bench.common, "time_once_ms", wall_time_ms)
    W, H, norms = bench.make_layer(16, 64, "cpu")
    for pattern in ("0.5", "2:4"):
        ours, _ = bench.bench_wanda(RUN, W, H, norms, pattern, copy_gbs=100.0)
        assert ours["op"] == "wanda_mask" and ours["gbps"] > 0
        ours = ours["extras"]
        assert ours["mask_diff"] == 0.0 and ours["rel_err_diff"] == 0.0
        assert ours["bytes"] == 16 * 64 * 2 + 64 * 4 + 16 * 64
