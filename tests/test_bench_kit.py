"""The bench kit on CPU: every bench script refuses clearly without a GPU, rows follow the shared schema,
results_table renders known rows into the expected markdown, and run_gpu.sh's table stage and stage
parsing work without a GPU."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_gpu_env():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hide any GPU, so this test means the same everywhere


@pytest.mark.parametrize("script", ["bench_linear", "bench_prune", "bench_model"])
def test_bench_script_exits_clearly_without_gpu(script, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=no_gpu_env(), timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{script}: needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


LINEAR_ROWS = [
    {"op": "linear", "provider": "dense", "shape": "11008x4096", "dtype": "bfloat16", "M": 16, "mode": "graph",
     "time_us": 36.5, "p10_us": 36.1, "p90_us": 37.25, "samples": 30, "tflops": 39.5, "gbps": 2480.0,
     "device": "GPU X", "commit": "abc1234", "extras": {"rel_err": 0.0031, "vs_dense": 1.0}},
    {"op": "linear", "provider": "prunekit", "shape": "11008x4096", "dtype": "bfloat16", "M": 16, "mode": "graph",
     "time_us": 22.0, "p10_us": 21.5, "p90_us": 23.0, "samples": 30, "tflops": 65.57, "gbps": 2200.5,
     "device": "GPU X", "commit": "abc1234", "extras": {"rel_err": 0.0042, "vs_dense": 1.659}},
]
PRUNE_ROWS = [
    {"op": "wanda_mask", "provider": "prunekit", "shape": "4096x4096", "dtype": "bfloat16", "M": None,
     "mode": "eager", "time_ms": 0.0512, "p10_ms": 0.05, "p90_ms": 0.06, "samples": 20, "tflops": None,
     "gbps": 983.2, "device": "GPU X", "commit": "abc1234", "extras": {"pattern": "2:4", "mask_diff": 0.0}},
    {"op": "sparsegpt_layer", "provider": "reference", "shape": "4096x4096", "dtype": "bfloat16", "M": None,
     "mode": "eager", "time_ms": 960.0, "p10_ms": 960.0, "p90_ms": 960.0, "samples": 1, "tflops": None,
     "gbps": None, "device": "GPU X", "commit": "abc1234", "extras": {"pattern": "0.5", "ok": True}},
]
RUN = {"script": "bench_x", "device": "GPU X", "date": "2026-01-02 03:04 UTC", "commit": "abc1234",
       "torch": "2.11.0", "cuda": "13.0", "argv": ["--M", "16"], "backends": {"_C": True}, "copy_gb_s": 2990.0}

EXPECTED = """### bench_x — GPU X, 2026-01-02 03:04 UTC, commit abc1234

torch 2.11.0, cuda 13.0; copy_gb_s: 2990; args: `--M 16`

#### linear

| shape | M | dtype | mode | provider | time (µs) | p10–p90 | TFLOP/s | GB/s | rel_err | vs_dense |
|---|---|---|---|---|---|---|---|---|---|---|
| 11008x4096 | 16 | bfloat16 | graph | dense | 36.5 | 36.1–37.25 | 39.5 | 2480 | 0.0031 | 1 |
| 11008x4096 | 16 | bfloat16 | graph | prunekit | 22 | 21.5–23 | 65.57 | 2200 | 0.0042 | 1.659 |

#### wanda_mask

| shape | dtype | mode | provider | time (ms) | p10–p90 | GB/s | pattern | mask_diff |
|---|---|---|---|---|---|---|---|---|
| 4096x4096 | bfloat16 | eager | prunekit | 0.0512 | 0.05–0.06 | 983.2 | 2:4 | 0 |

#### sparsegpt_layer

| shape | dtype | mode | provider | time (ms) | p10–p90 | pattern | ok |
|---|---|---|---|---|---|---|---|
| 4096x4096 | bfloat16 | eager | reference | 960 | 960–960 | 0.5 | yes |
"""


def test_results_table_renders_known_rows():
    table = load("results_table")
    assert table.render(RUN, LINEAR_ROWS + PRUNE_ROWS) == EXPECTED


def test_results_table_cli_reads_json_files(tmp_path, capsys):
    table = load("results_table")
    path = tmp_path / "bench_x.json"
    path.write_text(json.dumps({"run": RUN, "rows": LINEAR_ROWS + PRUNE_ROWS}))
    assert table.main([str(path)]) == 0
    assert capsys.readouterr().out == EXPECTED
    bare = tmp_path / "bench_y.json"  # a bare list of rows still renders, headed by the file name
    bare.write_text(json.dumps(LINEAR_ROWS))
    out = tmp_path / "tables.md"
    assert table.main([str(bare), str(tmp_path / "missing.json"), "-o", str(out)]) == 0
    assert out.read_text().startswith("### bench_y — ?, ?, commit ?")
    assert "missing.json does not exist" in capsys.readouterr().err
    assert table.main([str(tmp_path / "missing.json")]) == 1


def test_rows_follow_the_shared_schema():
    common = load("common")
    run = {"device": "GPU X", "commit": "abc1234"}
    timing = common.summarize([3.0, 1.0, 2.0, 10.0, 4.0], "us")
    assert timing == {"time_us": 3.0, "p10_us": 1.0, "p90_us": 10.0, "samples": 5}
    r = common.row(run, "linear", "dense", shape="8x8", dtype="torch.bfloat16", M=4, mode="graph", timing=timing,
                   flops=3e6, bytes_moved=6e3, rel_err=0.5)
    assert list(r) == ["op", "provider", "shape", "dtype", "M", "mode", "time_us", "p10_us", "p90_us", "samples",
                       "tflops", "gbps", "device", "commit", "extras"]
    assert r["dtype"] == "bfloat16" and r["tflops"] == 1.0 and r["gbps"] == 2.0 and r["extras"] == {"rel_err": 0.5}
    slow = common.row(run, "op", "p", shape="s", dtype="float32", timing=common.summarize([2.0], "ms"))
    assert slow["time_ms"] == slow["p10_ms"] == slow["p90_ms"] == 2.0 and slow["tflops"] is None
    with pytest.raises(ValueError):
        common.summarize([], "ms")


def test_write_results_writes_json_and_markdown(tmp_path):
    common = load("common")
    path = common.write_results(tmp_path / "out", "bench_x", RUN, LINEAR_ROWS)
    assert json.loads(path.read_text()) == {"run": RUN, "rows": LINEAR_ROWS}
    assert (tmp_path / "out" / "bench_x.md").read_text().startswith("### bench_x — GPU X")


def run_gpu_sh(*stages, out):
    return subprocess.run(["bash", str(BENCH / "run_gpu.sh"), *stages], capture_output=True, text=True,
                          env={**no_gpu_env(), "OUT": str(out)}, timeout=120, cwd=ROOT)


def test_run_gpu_sh_table_stage_and_stage_names(tmp_path):
    (tmp_path / "bench_linear.json").write_text(json.dumps({"run": RUN, "rows": LINEAR_ROWS}))
    done = run_gpu_sh("table", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "results.md").read_text().endswith(EXPECTED.split("#### wanda_mask")[0].rstrip("\n") + "\n")
    assert "table: ok" in (tmp_path / "run.log").read_text()
    bad = run_gpu_sh("tabel", out=tmp_path)
    assert bad.returncode == 2 and "unknown stage 'tabel'" in bad.stderr


def host_calls(calls, *, graph=True, **_):  # stands in for CUDA-event timing: only the plumbing is checked
    return {"time_us": 1.0, "p10_us": 1.0, "p90_us": 1.0, "samples": 1}


def host_once(fn, *, warmup=0, repeats=1):
    fn()
    return {"time_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0, "samples": 1}


def test_bench_mains_write_rows_on_cpu(tmp_path, monkeypatch, capsys):
    """bench_linear and bench_prune end to end on a tiny CPU problem with the GPU check and timers replaced:
    one row per provider, case and mode in the shared schema, JSON and markdown written."""
    import torch

    linear = load("bench_linear")
    monkeypatch.setattr(linear.common, "require_cuda", lambda script: torch.device("cpu"))
    monkeypatch.setattr(linear.common, "time_calls", host_calls)
    monkeypatch.setattr(linear.common, "time_once_ms", host_once)
    monkeypatch.setattr(linear.common, "l2_bytes", lambda device: 1 << 14)
    assert linear.main(["--shapes", "16x64", "--M", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_linear.json").read_text())
    assert data["run"]["script"] == "bench_linear" and data["run"]["device"] == "cpu"
    providers = [(r["provider"], r["mode"]) for r in data["rows"]]  # torch_24 runs on CUDA only
    assert providers == [(p, m) for p in ("dense", "prunekit", "prunekit_mma") for m in ("graph", "eager")]
    assert all(r["extras"]["vs_dense"] == 1.0 and r["extras"]["rel_err"] < 1e-2 for r in data["rows"])
    assert "| 16x64 | 3 | bfloat16 | graph | dense | 1 | 1–1 |" in (tmp_path / "bench_linear.md").read_text()

    pytest.importorskip("prunekit.ref.sparsegpt")
    prune = load("bench_prune")
    monkeypatch.setattr(prune.common, "copy_bandwidth_gbs", lambda device: 100.0)  # spares a 2 GiB host copy
    assert prune.main(["--shapes", "8x32", "--patterns", "2:4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_prune.json").read_text())["rows"]
    assert [(r["op"], r["provider"]) for r in rows] == [
        ("sparsegpt_layer", "prunekit"), ("sparsegpt_layer", "reference"),
        ("wanda_mask", "prunekit"), ("wanda_mask", "reference")]
    assert all(r["extras"]["mask_diff"] == 0.0 for r in rows)
    assert "#### wanda_mask" in capsys.readouterr().out
