"""prunekit.prune on tiny random-weight Hugging Face models and plain modules."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import calibrate
from prunekit.pruning.base import LayerResult, PruningMethod

from pipeline_models import BLOCK_PATH, calib_ids, expected_layers, tiny_model

pytest.importorskip("transformers")

METHODS = {"magnitude": pk.Magnitude, "wanda": pk.Wanda, "sparsegpt": pk.SparseGPT}


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_pattern(w: torch.Tensor, method: str, pattern: str) -> None:
    """Exact patterns: N:M per group; Wanda per row; magnitude per layer; SparseGPT per 128-column block."""
    zeros = w == 0
    if pattern == "2:4":
        assert ((~zeros).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    elif method == "wanda":
        assert (zeros.sum(1) == w.shape[1] // 2).all()
    elif method == "magnitude":
        assert int(zeros.sum()) == w.numel() // 2
    else:
        assert abs(zeros.float().mean().item() - 0.5) <= 1 / w.shape[0]


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "bert"])
def test_prunes_every_block_layer_with_the_exact_pattern(kind, method, pattern):
    model = tiny_model(kind)
    before = weights_of(model)
    report = pk.prune(model, METHODS[method](pattern), calib_ids(), progress=False, batch_size=4)

    assert [layer.name for layer in report.layers] == expected_layers(kind)
    assert report.blocks == BLOCK_PATH[kind]
    pruned = set(report.layers[i].name for i in range(len(report.layers)))
    for name, module in model.named_modules():
        if name in pruned:
            check_pattern(calibrate.layer_weight(module).detach(), method, pattern)
    for row in report.layers:
        assert row.pattern == pattern
        assert row.error > 0 and row.seconds >= 0
        assert abs(row.sparsity - 0.5) < 0.05
    if method == "sparsegpt":
        assert all(row.damping is not None for row in report.layers)
    # everything outside the pruned layers (embeddings, norms, LM head, biases) is untouched
    after = weights_of(model)
    touched = {f"{name}.weight" for name in pruned}
    for key, value in before.items():
        if key not in touched:
            assert torch.equal(after[key], value), key
    assert not model.training


# ------------------------------------------------------------------------------------------
def sequential_reference(model, method: PruningMethod, calib: torch.Tensor):
    """The references' loop written out for Llama: catch block 0's inputs, then per block gather
    statistics, prune every linear layer, re-run the block to feed the next one (one sample a time)."""
    layers = model.model.layers
    caught = []

    class Catcher(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, hidden, **kwargs):
            caught.append((hidden, kwargs))
            raise ValueError("caught")

    layers[0] = Catcher(layers[0])
    with torch.no_grad():
        for row in calib:
            try:
                model(input_ids=row[None], use_cache=False)
            except ValueError:
                pass
        layers[0] = layers[0].block
        inps = [h for h, _ in caught]
        kwargs = [kw for _, kw in caught]
        errors = {}
        for i, layer in enumerate(layers):
            subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            stats = {n: method.new_stats(m.in_features, name=n) for n, m in subset.items()}
            hooks = [m.register_forward_hook(lambda mod, a, out, n=n: stats[n].add_batch(a[0]))
                     for n, m in subset.items() if stats[n] is not None]
            for h, kw in zip(inps, kwargs):
                layer(h, **kw)
            for hook in hooks:
                hook.remove()
            dense = {}
            for n, m in subset.items():
                dense[n] = m.weight.detach().clone()
                m.weight.data = method.prune_layer(m.weight.detach().clone(), stats[n], n).weight
            errs = {n: 0.0 for n in subset}

            def measure(mod, a, out, n):
                errs[n] += float(((a[0] @ (dense[n] - mod.weight).t()) ** 2).sum())

            hooks = [m.register_forward_hook(lambda mod, a, out, n=n: measure(mod, a, out, n))
                     for n, m in subset.items()]
            inps = [layer(h, **kw) for h, kw in zip(inps, kwargs)]
            for hook in hooks:
                hook.remove()
            errors.update({f"model.layers.{i}.{n}": e for n, e in errs.items()})
    return errors


@pytest.mark.parametrize("method", [pk.Wanda("2:4"), pk.SparseGPT(0.5), pk.Magnitude(0.5)], ids=repr)
def test_equals_the_hand_written_sequential_reference(method):
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    calib = calib_ids(6, 16)
    report = pk.prune(model, method, calib, progress=False)
    errors = sequential_reference(reference, method, calib)
    got, want = weights_of(model), weights_of(reference)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for row in report.layers:
        assert row.error == pytest.approx(errors[row.name], rel=1e-4)


def test_block_i_is_calibrated_on_pruned_outputs_of_earlier_blocks():
    """Pruning block 1 alone from dense inputs gives other masks than the pipeline, which feeds it
    the pruned block 0's outputs."""
    calib = calib_ids(8, 16)
    full = tiny_model("llama")
    pk.prune(full, pk.Wanda(0.5), calib, progress=False)
    only_second = tiny_model("llama")
    pk.prune(only_second, pk.Wanda(0.5), calib, include="model.layers.1.*", progress=False)
    a = full.model.layers[1].mlp.down_proj.weight
    b = only_second.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(a != 0, b != 0)


def test_deterministic_for_a_seed():
    results = []
    for _ in range(2):
        model = tiny_model("opt")
        report = pk.prune(model, pk.SparseGPT("2:4"), calib_ids(), progress=False, seed=3)
        results.append((weights_of(model), [(r.name, r.error, r.damping) for r in report.layers]))
    (w1, r1), (w2, r2) = results
    assert r1 == r2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_save_pretrained_round_trips_pruned_weights(tmp_path):
    model = tiny_model("gpt2")
    pk.prune(model, pk.Wanda("2:4"), calib_ids(), progress=False)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    want, got = weights_of(model), weights_of(loaded)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_offload_path_gives_the_same_model():
    """device 'cpu:0' differs from the model's 'cpu' as a device object, so the offload code path
    (non-block modules moved, each block moved in and out) runs without a GPU."""
    calib = calib_ids()
    plain, offloaded = tiny_model("llama"), tiny_model("llama")
    pk.prune(plain, pk.SparseGPT(0.5), calib, progress=False)
    pk.prune(offloaded, pk.SparseGPT(0.5), calib, progress=False, offload=True, device="cpu:0")
    a, b = weights_of(plain), weights_of(offloaded)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_cuda_run_matches_cpu(offload):
    calib = calib_ids()
    cpu_model, gpu_model = tiny_model("llama"), tiny_model("llama")
    pk.prune(cpu_model, pk.Wanda("2:4"), calib, progress=False)
    seen = []
    hook = gpu_model.model.layers[1].register_forward_pre_hook(
        lambda m, a: seen.append((next(m.parameters()).device.type,
                                  gpu_model.model.layers[0].self_attn.q_proj.weight.device.type)))
    pk.prune(gpu_model, pk.Wanda("2:4"), calib, progress=False, device="cuda", offload=offload)
    hook.remove()
    assert seen and all(d == "cuda" for d, _ in seen)
    if offload:
        assert all(other == "cpu" for _, other in seen)  # only the block being pruned is on the GPU
    assert calibrate.model_device(gpu_model).type == "cpu"  # the model is left where it was
    for (name, a), b in zip(cpu_model.state_dict().items(), gpu_model.state_dict().values()):
        if a.is_floating_point():
            assert ((a == 0) == (b == 0)).float().mean() > 0.99, name


# ----------------------------------------------------------------------------- selection
def test_include_exclude_patterns():
    model = tiny_model("llama")
    report = pk.prune(model, pk.Magnitude(0.5), calib_ids(), exclude="*.mlp.*", progress=False)
    assert report.layers and all(".mlp." not in r.name for r in report.layers)
    assert model.model.layers[0].mlp.up_proj.weight.ne(0).all()
    model = tiny_model("llama")
    report = pk.prune(model, pk.Magnitude(0.5), calib_ids(), include=r"re:model\.layers\.\d+\.self_attn\.q_proj",
                      progress=False)
    assert [r.name for r in report.layers] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_lm_head_is_dense_by_default_and_prunable_when_included():
    model = tiny_model("llama")
    pk.prune(model, pk.Wanda(0.5), calib_ids(), progress=False)
    assert model.lm_head.weight.ne(0).all() and model.model.embed_tokens.weight.ne(0).all()
    model = tiny_model("llama")
    report = pk.prune(model, pk.Wanda(0.5), calib_ids(), include=["lm_head", "model.layers.1.mlp.*"],
                      progress=False)
    assert [r.name for r in report.layers][-1] == "lm_head"
    assert (model.lm_head.weight.eq(0).sum(1) == 32).all()  # outside the blocks: whole-model forwards
    assert report["lm_head"].error > 0


def test_global_magnitude_ranks_all_layers_together():
    model = tiny_model("bert")
    report = pk.prune(model, pk.Magnitude(0.5, scope="global"), calib_ids(), progress=False)
    weights = [calibrate.layer_weight(model.get_submodule(r.name)) for r in report.layers]
    total = sum(w.numel() for w in weights)
    assert sum(int(w.eq(0).sum()) for w in weights) == total // 2
    assert len({round(r.sparsity, 3) for r in report.layers}) > 1  # layers differ, the total is exact


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.stages = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x):
        x = self.inp(x)
        for block in self.stages:
            x = block(x)
        return x


def float_batches(n=4, width=16):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(2, 5, width, generator=g)} for _ in range(n)]


def test_any_module_with_a_named_or_discovered_block_list():
    torch.manual_seed(0)
    named = Stack()
    found = copy.deepcopy(named)
    r1 = pk.prune(named, pk.Wanda(0.5), float_batches(), blocks="stages", progress=False)
    r2 = pk.prune(found, pk.Wanda(0.5), float_batches(), progress=False)
    assert r1.blocks == r2.blocks == "stages"
    assert [r.name for r in r1.layers] == [f"stages.{i}.{n}" for i in range(3) for n in ("up", "down")]
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), found.state_dict().values()))


def test_model_without_blocks_prunes_each_linear_from_one_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [{"input": b["x"]} for b in float_batches()]
    report = pk.prune(model, pk.SparseGPT("2:4"), batches, progress=False)
    assert report.blocks is None
    assert [r.name for r in report.layers] == ["0", "2"]
    for layer in (model[0], model[2]):
        assert (layer.weight.ne(0).reshape(layer.weight.shape[0], -1, 4).sum(-1) == 2).all()


class CountingMethod(PruningMethod):
    """Records the statistics objects it receives (to see which layers share them)."""

    needs_act_norm = True

    def __init__(self):
        super().__init__(0.5)
        self.seen = {}

    def prune_layer(self, weight, stats, name="layer"):
        self.seen[name] = stats
        keep = torch.ones_like(weight, dtype=torch.bool)
        keep[:, ::2] = False
        return LayerResult(weight.masked_fill(~keep, 0), keep, self.pattern)


def test_layers_reading_the_same_input_share_statistics():
    method = CountingMethod()
    pk.prune(tiny_model("llama"), method, calib_ids(), progress=False, batch_size=2)
    s = method.seen
    prefix = "model.layers.0."
    assert s[prefix + "self_attn.q_proj"] is s[prefix + "self_attn.k_proj"] is s[prefix + "self_attn.v_proj"]
    assert s[prefix + "mlp.gate_proj"] is s[prefix + "mlp.up_proj"]
    assert s[prefix + "self_attn.o_proj"] is not s[prefix + "self_attn.q_proj"]
    assert s[prefix + "self_attn.q_proj"].nsamples == 8


# ---------------------------------------------------------------------------------- errors
def test_clear_errors_on_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no linear layer matched"):
        pk.prune(model, pk.Wanda(0.5), calib_ids(), include="nothing.*", progress=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        pk.prune(nn.Sequential(nn.ReLU()), pk.Wanda(0.5), [{"input": torch.randn(2, 4)}], progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        pk.prune(model, pk.Wanda(0.5), torch.randn(4, 16), progress=False)
    with pytest.raises(ValueError, match=r"\[n_samples, seq_len\]"):
        pk.prune(model, pk.Wanda(0.5), calib_ids().reshape(-1), progress=False)
    with pytest.raises(ValueError, match="longer than the model supports"):
        pk.prune(model, pk.Wanda(0.5), calib_ids(2, 65), progress=False)
    with pytest.raises(ValueError, match="token ids must lie in"):
        pk.prune(model, pk.Wanda(0.5), calib_ids() + 1000, progress=False)
    with pytest.raises(ValueError, match="no submodule"):
        pk.prune(model, pk.Wanda(0.5), calib_ids(), blocks="model.blocks", progress=False)
    with pytest.raises(ValueError, match="divisible by M=8"):
        pk.prune(Stack(width=12), pk.Wanda("4:8"), float_batches(width=12), progress=False)
    with pytest.raises(TypeError, match="pruning method"):
        pk.prune(model, "wanda", calib_ids(), progress=False)
    assert all(p.ne(0).all() for n, p in model.named_parameters() if n.endswith("proj.weight"))


# ---------------------------------------------------------------------------------- report
def test_report_table_and_json(tmp_path):
    model = tiny_model("opt")
    report = pk.prune(model, pk.SparseGPT(0.5), calib_ids(), progress=False)
    text = str(report)
    assert "model.decoder.layers.1.fc2" in text and "total" in text and "damping" in text
    path = tmp_path / "report.json"
    report.to_json(path)
    data = json.loads(path.read_text())
    assert data["totals"]["layers"] == 12 and data["totals"]["sparsity"] == pytest.approx(report.sparsity)
    again = pk.PruneReport.from_json(path)
    assert again.layers == report.layers and again.method == report.method


def test_report_plot(tmp_path, monkeypatch):
    report = pk.prune(tiny_model("llama"), pk.Magnitude(0.5), calib_ids(), progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"prunekit\[plot\]"):
        report.plot(tmp_path / "r.png")
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_report_sparsity_is_the_real_fraction_of_zeros():
    model = tiny_model("llama")
    pk.prune(model, pk.Wanda(0.5), calib_ids(4, 16), progress=False)
    report = pk.prune(model, pk.Wanda("2:4"), calib_ids(4, 16), progress=False)
    zeros = total = 0
    for row in report.layers:
        w = model.get_submodule(row.name).weight
        assert row.sparsity == pytest.approx(float((w == 0).float().mean()), abs=1e-12)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    assert report.sparsity == pytest.approx(zeros / total) and report.sparsity > 0.55


def test_shared_hessian_notes_are_given_once_without_repeating_the_layer_name(caplog):
    """percdamp=0 with fewer tokens than features: H is singular, damping escalates. q/k/v share H;
    only q_proj, which factored it, carries (and logs) the note."""
    model = tiny_model("llama")
    with caplog.at_level("INFO", logger="prunekit"):
        report = pk.prune(model, pk.SparseGPT(0.5, percdamp=0.0), calib_ids(1, 8), progress=False)
    q, k = report["model.layers.0.self_attn.q_proj"], report["model.layers.0.self_attn.k_proj"]
    assert len(q.notes) == 1 and "Cholesky" in q.notes[0] and k.notes == []
    assert k.damping == q.damping and q.damping > 0
    text = str(report)
    assert "note: model.layers.0.self_attn.q_proj: the float32 Cholesky" in text
    assert "q_proj: model.layers.0.self_attn.q_proj" not in text
    logged = [r.getMessage() for r in caplog.records if "Cholesky" in r.getMessage()]
    assert len(logged) == len([n for row in report.layers for n in row.notes])


def test_joint_quantization_keeps_scales_and_zero_points_on_the_report():
    model = tiny_model("llama")
    report = pk.prune(model, pk.SparseGPT("2:4", quant=pk.QuantSpec(4, 32)), calib_ids(2, 16), progress=False)
    assert set(report.quant) == {row.name for row in report.layers}
    for name, params in report.quant.items():
        w = model.get_submodule(name).weight.detach()
        assert params.bits == 4 and params.groupsize == 32 and params.scale.shape == (w.shape[0], w.shape[1] // 32)
        codes = params.codes(w)
        assert torch.equal(params.dequantize(codes).to(w.dtype), w)  # the weight lies on its integer grid
    assert report.to_dict()["quant"]["model.layers.0.mlp.down_proj"] == {"bits": 4, "groupsize": 32}


@pytest.mark.parametrize("method", [pk.Magnitude(0.5), pk.Wanda(0.5)], ids=repr)
def test_every_submodule_gets_its_own_training_flag_back(method):
    model = tiny_model("llama").train()
    model.model.layers[0].eval()
    pk.prune(model, method, calib_ids(2, 16), progress=False)
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training and not model.model.layers[0].mlp.training
