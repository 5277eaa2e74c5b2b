"""`prunekit selftest`: the grid covers every CPU route (C++ and Triton under the interpreter), a broken kernel
makes it fail with a non-zero exit, the table and JSON say which. The full CPU grid runs in CI (.ci/run)."""
import json

import torch

from prunekit import cli, selftest, selftest_cases
from prunekit.ops import selfcheck, sparse_cpu


def test_cpu_grid_has_every_route_and_no_silent_skip():
    cases = selftest_cases.all_cases(torch.device("cpu"))
    routes = {(c.op, c.route) for c in cases}
    for op in ("pack24", "unpack24", "nm_keep_mask", "row_keep_mask", "wanda_keep_mask", "obs_sweep"):
        assert (op, "c++") in routes and (op, "triton") in routes, op
    assert ("act_norm_sq_update", "triton") in routes and ("sparse24_linear", "dense") in routes
    skipped = {(c.op, c.route) for c in cases if c.run is None}
    unsupported = {(op, f"c++ {isa}") for isa in selftest_cases.CPU_ISAS
                   for op in ("sparse_cpu_linear", "bitmask_unpack")
                   if not sparse_cpu.isa_supported(isa)}  # an ISA this CPU lacks, and said so
    assert skipped == {("hessian_update", "tensor_core")} | unsupported  # CUDA only, and said so
    assert all(c.why for c in cases if c.run is None)


def test_cpu_grid_covers_every_sparse_cpu_path():
    """Each ISA path of the CPU sparse kernels, both formats, three dtypes, the M of each kernel variant."""
    cases = [c for c in selftest_cases.all_cases(torch.device("cpu")) if c.op == "sparse_cpu_linear"]
    combos = {(c.route, c.shape.split()[0], c.shape.split()[-1], c.dtype) for c in cases}
    assert len(combos) == len(cases) == len(selftest_cases.CPU_ISAS) * len(selftest_cases.CPU_MS) * 2 * 3
    runnable = [c for c in cases if c.run is not None]
    assert {c.route for c in runnable} == {f"c++ {isa}" for isa in selftest_cases.CPU_ISAS
                                           if sparse_cpu.isa_supported(isa)}
    unpack = [c for c in selftest_cases.all_cases(torch.device("cpu")) if c.op == "bitmask_unpack"]
    assert len(unpack) == len(selftest_cases.CPU_ISAS) * 3
    for case in runnable[::7] + [c for c in unpack if c.run is not None]:
        selftest.execute(case, torch.device("cpu"))
        assert case.result["status"] == "pass", case.result


def test_cpu_sparse_case_catches_a_wrong_kernel(monkeypatch):
    case = next(c for c in selftest_cases.all_cases(torch.device("cpu"))
                if c.op == "sparse_cpu_linear" and c.run is not None and c.dtype == "fp32")
    good = case.run()
    case.run = lambda: good * (1 + 1e-4)  # a 1e-4 relative error: inside bf16's tolerance, not fp32's
    selftest.execute(case, torch.device("cpu"))
    assert case.result["status"] == "fail"


def test_broken_kernel_fails_the_run_with_table_and_json(tmp_path, monkeypatch, capsys):
    good = selftest.Case("nm_keep_mask", "triton", "4x8 2:4", "fp32", lambda: torch.ones(2, dtype=torch.bool),
                         lambda: torch.ones(2, dtype=torch.bool), selfcheck.exact)
    bad = selftest.Case("obs_sweep", "cuda", "9x32 mask", "fp32", lambda: torch.tensor([1.0, 2.0]),
                        lambda: torch.tensor([1.0, 2.5]), selfcheck.rows_within(1e-4))
    raising = selftest.Case("pack24", "triton", "1x8", "bf16", lambda: 1 / 0, lambda: None, selfcheck.exact)
    skipped = selftest.Case("sparse24_linear", "sm90", "M=128", "bf16", None, lambda: None, selfcheck.exact,
                            "not built: no CUTLASS")
    monkeypatch.setattr(selftest, "build_cases", lambda device: [good, bad, raising, skipped])
    out = tmp_path / "st.json"
    assert cli.main(["selftest", "--device", "cpu", "--json", str(out)]) == selftest.EXIT_FAIL
    table = capsys.readouterr().out
    assert "obs_sweep" in table and "FAIL" in table and "ZeroDivisionError" in table and "not built" in table
    report = json.loads(out.read_text())
    assert report["summary"] == {"pass": 1, "fail": 2, "skip": 1}
    assert [r["status"] for r in report["results"]] == ["pass", "fail", "fail", "skip"]
    assert report["results"][1]["max_error"] > 0.1 and "backends" in report

    monkeypatch.setattr(selftest, "build_cases", lambda device: [good, skipped])
    assert selftest.main("cpu", None) == 0
    assert selftest.main("cpu", None, strict=True) == selftest.EXIT_FAIL


def test_cuda_requested_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert selftest.main("cuda", None) == selftest.EXIT_NO_DEVICE
    assert "sees no CUDA device" in capsys.readouterr().err


def test_a_few_real_cases_pass():
    cases = [c for c in selftest_cases.all_cases(torch.device("cpu"))
             if c.op in ("pack24", "nm_keep_mask") and c.run is not None][:4]
    for case in cases:
        selftest.execute(case, torch.device("cpu"))
        assert case.result["status"] == "pass", case.result
