"""bench_decode on CPU: it refuses clearly without a GPU, and its pipeline (build, magnitude 2:4, sparsify,
static-cache greedy decode, rows) runs end to end on a tiny LLaMA with the CUDA-event timer replaced."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
TINY = ["--layers", "2", "--hidden-size", "64", "--intermediate-size", "96", "--heads", "4", "--vocab-size", "97",
        "--prompt", "5", "--new-tokens", "6"]


def load_bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exits_clearly_without_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "bench_decode.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "bench_decode: needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())


def host_decode_ms(decoder, new_tokens, graph):  # stands in for the CUDA graph and events: plumbing only
    decoder.restart()
    for _ in range(new_tokens):
        decoder.step()
    return [1.0] * new_tokens


def test_pipeline_on_a_tiny_model(tmp_path, monkeypatch):
    bench = load_bench_decode()
    monkeypatch.setattr(bench.common, "require_cuda", lambda script: torch.device("cpu"))
    monkeypatch.setattr(bench, "decode_ms", host_decode_ms)
    # The bench measures the GPU's packed route; on this CPU stand-in the CPU route would time the tiny layers
    # and may keep them dense (its own, separately tested choice), so pin it to the packed kernel.
    monkeypatch.setenv("PRUNEKIT_SPARSE_CPU", "sparse")
    assert bench.main([*TINY, "--out", str(tmp_path)]) == 0

    data = json.loads((tmp_path / "bench_decode.json").read_text())
    run, rows = data["run"], data["rows"]
    assert run["pruned_layers"] == run["swapped_layers"] == 2 * 7  # q k v o gate up down per layer
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in ("dense", "prunekit") for m in ("graph", "eager")]
    for r in rows:
        assert r["op"] == "decode" and r["M"] == 1 and r["dtype"] == "bfloat16"
        assert r["shape"] == "h64-i96-v97:2L" and r["samples"] == 6 and r["time_ms"] == 1.0
        assert r["extras"]["tokens_per_s"] == 1000.0 and r["extras"]["vs_dense"] == 1.0
        assert r["extras"]["logit_err"] < 0.02  # the same pruned weights, dense GEMM vs the 2:4 kernel
    sparse_gib = rows[2]["extras"]["weight_gib"]
    assert sparse_gib < 0.75 * rows[0]["extras"]["weight_gib"]  # packed 2:4 blocks read fewer bytes
    assert rows[1]["extras"]["agree"] == 1.0  # eager reruns the same decode: same tokens
    assert "#### decode" in (tmp_path / "bench_decode.md").read_text()


def test_decoder_matches_generate_and_prunes_to_24():
    """The hand-rolled static-cache loop generates what transformers' greedy generate does, and every block
    Linear comes out exactly 2:4."""
    bench = load_bench_decode()
    args = bench.parse_args(TINY)
    torch.manual_seed(0)
    model = bench.build_model(args.layers, 64, "cpu", **bench.model_sizes(args)).float()
    assert bench.prune_blocks_24(model) == 14
    for m in model.model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            assert ((m.weight.reshape(m.out_features, -1, 4) != 0).sum(-1) <= 2).all()
    prompt = torch.randint(0, args.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    decoder = bench.Decoder(model, prompt, new_tokens=6)
    host_decode_ms(decoder, 6, graph=False)
    expected = model.generate(prompt, max_new_tokens=7, do_sample=False, min_new_tokens=7)[0, 5:].tolist()
    assert decoder.generated() == expected
    assert bench.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5


def test_run_gpu_sh_knows_decode_and_folds_markdown_into_results(tmp_path):
    """The table stage renders every bench_*.json into results.md and drops the per-bench .md copies,
    so run.log, results.md and the four JSON files stay within the device tool's 8 files."""
    rows = [{"op": "decode", "provider": "dense", "shape": "llama7b:32L", "dtype": "bfloat16", "M": 1, "mode": "graph",
             "time_ms": 8.0, "p10_ms": 7.9, "p90_ms": 8.2, "samples": 128, "tflops": None, "gbps": 1650.0,
             "device": "GPU X", "commit": "abc1234", "extras": {"tokens_per_s": 125.0}}]
    (tmp_path / "bench_decode.json").write_text(json.dumps({"run": {"script": "bench_decode"}, "rows": rows}))
    (tmp_path / "bench_decode.md").write_text("tables")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(BENCH / "run_gpu.sh"), "table"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=BENCH.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| llama7b:32L | 1 | bfloat16 | graph | dense | 8 |" in (tmp_path / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_decode.json", "results.md", "run.log"]
    help_text = subprocess.run(["bash", str(BENCH / "run_gpu.sh"), "--help"], capture_output=True, text=True).stdout
    assert "decode bench/bench_decode.py $DECODE_ARGS" in help_text
