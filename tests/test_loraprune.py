"""LoRAPrune: the LoRA-guided criterion against a direct computation from the adapters and against
the full gradient, iterative pruning to the target, exact masking -> shrinking, reload, memory."""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit as pk
from prunekit import calibrate
from prunekit.pruning import loraprune as lpm
from prunekit.pruning import structured_groups as groups
from prunekit.pruning import structured_importance as scoring
from prunekit.pruning import structured_plan as plans

from pipeline_models import MAX_POS, VOCAB, calib_ids, tiny_model

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def model_of(kind: str, seed: int = 0, hidden: int = 64, inter: int = 128):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                  tie_word_embeddings=False)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)).eval()
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common)).eval()
    if kind == "llama" and hidden != 64:
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    return tiny_model(kind, seed)


def randomize_b(lp, seed: int = 1):
    """peft starts B at zero; give it values so both terms of the criterion matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lp.peft_model.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                b = m.lora_B["default"].weight
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def backward(lp, ids):
    lp.peft_model.zero_grad(set_to_none=True)
    lp.peft_model(input_ids=ids, labels=ids).loss.backward()


def direct_scores(block, kind, grads=None):
    """Σ over each group's weights of |(W + s·B·A) ⊙ ((∂L/∂B)·A + B·(∂L/∂A))|, one group at a time;
    with `grads` (∂L/∂W of the merged model, by path) the estimate s·(G·AᵀA + B·Bᵀ·G) instead."""
    scores = torch.zeros(kind.count, dtype=torch.float64)
    for s in kind.slices:
        layer = block.get_submodule(s.path)
        a = layer.lora_A["default"].weight.double()
        b = layer.lora_B["default"].weight.double()
        scale = layer.scaling["default"]
        w = calibrate.layer_weight(layer.base_layer).double()
        if grads is None:
            g = layer.lora_B["default"].weight.grad.double() @ a + b @ layer.lora_A["default"].weight.grad.double()
        else:
            full = grads[s.path].double()
            g = scale * (full @ a.t() @ a + b @ b.t() @ full)
        imp = ((w + scale * b @ a) * g).abs()
        for group in range(kind.count):
            part = imp[group * s.size:(group + 1) * s.size] if s.dim == "out" else imp[:, group * s.size:(group + 1) * s.size]
            scores[group] += part.sum()
    return scores


def test_group_scores_equal_direct_computation_and_full_gradient_estimate():
    model = model_of("llama")
    dense = copy.deepcopy(model)
    lp = lpm.LoRAPrune(model, heads=0.5, mlp=0.25)
    randomize_b(lp)
    ids = calib_ids(2, 12)
    backward(lp, ids)
    # the reference: the merged model W + s·B·A with W trainable gives ∂L/∂W = ∂L/∂(ΔW)
    merged = copy.deepcopy(dense)
    for name, module in lp.peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            target = merged.get_submodule(path)
            with torch.no_grad():
                d = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                target.weight.add_(d)
    merged(input_ids=ids, labels=ids).loss.backward()
    for index, block in enumerate(lp.block_list):
        ref_block = merged.model.layers[index]
        for kind in lp.kinds:
            got = lpm.lora_group_scores([block.get_submodule(s.path) for s in kind.slices], kind)
            torch.testing.assert_close(got, direct_scores(block, kind), rtol=1e-5, atol=1e-9)
            grads = {s.path: ref_block.get_submodule(s.path).weight.grad for s in kind.slices}
            torch.testing.assert_close(got, direct_scores(block, kind, grads), rtol=1e-4, atol=1e-9)
            assert float(got.min()) > 0
    # the per-weight criterion is the same quantity
    layer = lp.block_list[0].mlp.down_proj
    imp = lpm.lora_guided_importance(layer)
    kind = lp.kinds[1]
    torch.testing.assert_close(imp.double().sum(0), direct_scores(lp.block_list[0], groups.GroupKind(
        "down", kind.count, (kind.slices[-1],), kind.slices[-1])), rtol=1e-5, atol=1e-9)


def test_moving_average():
    lp = lpm.LoRAPrune(model_of("llama"), mlp=0.25, beta=0.9)
    randomize_b(lp)
    firsts = []
    for seed in (0, 1):
        backward(lp, calib_ids(2, 10, seed=seed))
        kind = lp.kinds[0]
        firsts.append(lpm.lora_group_scores([lp.block_list[1].get_submodule(s.path) for s in kind.slices], kind))
        lp.accumulate()
    torch.testing.assert_close(lp.scores[1]["mlp"], 0.9 * firsts[0] + 0.1 * firsts[1])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind,heads,mlp", [("llama", 0.5, 0.25), ("qwen2", 0.5, 0.5), ("mistral", 0.5, 0.25),
                                            ("gpt2", 0.0, 0.25), ("opt", 0.0, 0.5)])
def test_iterative_reaches_target_masks_equal_shrunk_and_reload(tmp_path, kind, heads, mlp):
    model = model_of(kind)
    lp = lpm.LoRAPrune(model, heads=heads, mlp=mlp, r=4)
    opt = torch.optim.AdamW(lp.parameters(), lr=1e-2)
    counts = []
    ids = calib_ids(4, 12)
    for step, progress in enumerate((1 / 3, 2 / 3, 1.0)):
        backward(lp, ids[step:step + 2])
        lp.accumulate()
        opt.step()
        lp.prune(progress)
        counts.append({k: int(m.sum()) for k, m in lp._kept[0].items()})
        if step:  # nested: a pruned group stays pruned
            assert all(not (lp._kept[0][k] & ~previous[k]).any() for k in previous)
        previous = {k: m.clone() for k, m in lp._kept[0].items()}
    if "mlp" in counts[0]:
        width = {"gpt2": 256}.get(kind, 128)
        assert counts[0]["mlp"] > counts[1]["mlp"] > counts[2]["mlp"] == plans.kept_channels(width, mlp, 1)
    test_ids = calib_ids(2, 9, seed=3)
    lp.peft_model.eval()
    masked = logits(lp.peft_model, test_ids)
    report = lp.finalize()
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    torch.testing.assert_close(logits(model, test_ids), masked, rtol=1e-4, atol=1e-5)
    assert report.params[1] < report.params[0] and report.importance == "loraprune"
    if heads:
        assert report.kv_heads == (2, 1) and model.config.num_key_value_heads == 1
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(logits(reloaded, test_ids), logits(model, test_ids))
    gen = model.generate(test_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 12) and torch.equal(
        reloaded.generate(test_ids, max_new_tokens=3, do_sample=False, pad_token_id=0), gen)


def test_loraprune_driver_trains_and_reaches_target():
    model = model_of("llama", seed=3)
    teacher = copy.deepcopy(model)
    report = pk.loraprune(model, calib_ids(4, 16), heads=0.5, mlp=0.5, steps=8, iterations=3, lr=1e-2,
                          teacher=teacher, alpha=0.5, batch_size=2, progress=False)
    assert report.iterations == 3 and report.steps == 8 and len(report.losses) == 8
    assert (report.heads, report.kv_heads, report.mlp) == ((4, 2), (2, 1), (128, 64))
    assert model.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    assert all(p.requires_grad for p in model.parameters())  # peft's freezing is undone


def peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated inside fn, from the profiler's allocation/free events
    (deterministic byte counts, not timings)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    assert events, "the profiler recorded no allocations"
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def test_peak_memory_below_taylor_full_gradients():
    from prunekit import data

    model = model_of("llama", hidden=128, inter=512)
    ids = calib_ids(2, 16)
    blocks = model.model.layers
    kinds = [groups.group_kinds(groups.detect_family(b), model.config, True, True, b) for b in blocks]
    group_bytes = 4 * sum(b.get_submodule(s.path).weight.numel() for b in blocks for k in kinds[0] for s in k.slices)
    taylor = peak_bytes(lambda: scoring.loss_gradients(model, blocks, kinds, data.as_batches(ids, batch_size=2)))
    lp = lpm.LoRAPrune(model, heads=0.5, mlp=0.5)

    def lora_step():
        backward(lp, ids)
        lp.accumulate()
        lp.peft_model.zero_grad(set_to_none=True)

    lora_step()  # first call allocates the moving averages
    lora = peak_bytes(lora_step)
    # Taylor holds every group layer's full gradient (and its fp32 sum); LoRAPrune saves at least that
    assert taylor > 1.5 * group_bytes
    assert lora < taylor - group_bytes, (lora, taylor, group_bytes)


def test_unstructured_reaches_sparsity_and_masks_the_merged_delta():
    model = model_of("llama", seed=4)
    report = pk.loraprune(model, calib_ids(4, 12), sparsity=0.5, steps=6, iterations=2, lr=1e-2,
                          batch_size=2, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3) and 0 < report.delta_dropped < 1
    for block in model.model.layers:
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            w = block.get_submodule(name).weight
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1 / w.numel())
    assert "unstructured" in str(report)


def test_unstructured_masks_follow_the_moving_average():
    lp = lpm.LoRAPrune(model_of("llama"), sparsity=0.25)
    randomize_b(lp)
    backward(lp, calib_ids(2, 10))
    lp.accumulate()
    lp.prune(1.0)
    for name, layer in lp.layers.items():
        scores, keep = lp.scores[0][name], lp._weight_keep[name]
        assert int((~keep).sum()) == round(0.25 * scores.numel())
        assert float(scores[~keep].max()) <= float(scores[keep].min())
        assert bool((layer.base_layer.weight[~keep] == 0).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "nothing to prune"),
    (dict(heads=0.5, sparsity=0.5), "not both"),
    (dict(mlp=0.5, r=0), "rank"),
    (dict(mlp=0.5, beta=1.0), "beta"),
    (dict(mlp=1.5), "mlp: expected a fraction"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lpm.LoRAPrune(model_of("llama"), **kwargs)


def test_refusals():
    with pytest.raises(ValueError, match="GPT-2 fuses"):
        lpm.LoRAPrune(model_of("gpt2"), heads=0.5)
    lp = lpm.LoRAPrune(model_of("llama"), mlp=0.5)
    with pytest.raises(RuntimeError, match="no importance yet"):
        lp.prune(1.0)
    with pytest.raises(RuntimeError, match="target was not reached"):
        lp.finalize()
    with pytest.raises(ValueError, match="steps/iterations"):
        pk.loraprune(model_of("llama"), calib_ids(2, 8), mlp=0.5, steps=3, iterations=3)


def test_error_during_training_removes_adapters(monkeypatch):
    from prunekit.train import distill

    model = model_of("llama", seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    real = distill.lm_loss
    monkeypatch.setattr(distill, "lm_loss", failing)
    with pytest.raises(RuntimeError, match="boom"):
        pk.loraprune(model, calib_ids(2, 8), mlp=0.5, steps=6, iterations=2, progress=False)
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # no mask hook left behind
        ids = calib_ids(1, 6)
        assert torch.equal(model(input_ids=ids).logits, model_of("llama", seed=6)(input_ids=ids).logits)


def test_driver_gives_back_each_submodules_training_flag():
    model = model_of("llama", seed=7).train()
    blocks = list(model.model.layers)
    blocks[1].eval()
    teacher = copy.deepcopy(model).train()
    teacher.model.layers[0].eval()
    pk.loraprune(model, calib_ids(2, 8), mlp=0.5, steps=3, iterations=1, teacher=teacher, progress=False)
    assert model.training and all(m.training for m in blocks[0].modules())
    assert not any(m.training for m in blocks[1].modules())
    assert teacher.training and not teacher.model.layers[0].training and teacher.model.layers[1].training


def test_bert_encoder_prunes_mlp_by_embedding_distillation_and_reloads(tmp_path):
    """BERT has no LM head: the adapters train on 1 − cos to the teacher's mean-pooled embedding; the masked
    encoder equals the shrunk one, which reloads bit for bit. Heads are refused (see structured_groups)."""
    from prunekit.train import lora as lora_mod

    dense = tiny_model("bert", seed=8)
    model = copy.deepcopy(dense)
    lp = lpm.LoRAPrune(model, mlp=0.5, r=4)
    opt = torch.optim.AdamW(lp.parameters(), lr=1e-2)
    batch = {"input_ids": calib_ids(2, 10, seed=2)}
    kept = []
    for progress in (0.5, 1.0):
        lp.peft_model.zero_grad(set_to_none=True)
        lora_mod.embedding_loss(lp.peft_model, dense, batch).backward()
        lp.accumulate()
        opt.step()
        lp.prune(progress)
        kept.append([int(per["mlp"].sum()) for per in lp._kept])
    assert kept == [[96, 96], [64, 64]]
    ids = calib_ids(2, 9, seed=3)
    with torch.no_grad():
        masked = lp.peft_model(input_ids=ids).last_hidden_state
    report = lp.finalize()
    assert report.mlp == (128, 64) and model.encoder.layer[0].intermediate.dense.weight.shape == (64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, masked, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModel.from_pretrained(tmp_path).eval()
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no LM head.*needs a teacher"):
        pk.loraprune(copy.deepcopy(dense), calib_ids(2, 8), mlp=0.5, steps=3, iterations=1, progress=False)
    with pytest.raises(ValueError, match="BERT: .*pruned_heads"):
        lpm.LoRAPrune(copy.deepcopy(dense), heads=0.5)
    report = pk.loraprune(copy.deepcopy(dense), calib_ids(2, 8), mlp=0.25, steps=3, iterations=1, teacher=dense,
                          progress=False)
    assert report.mlp == (128, 96) and len(report.losses) == 3


def test_blocks_of_different_widths_are_refused():
    from structured_models import model_of as structured_model

    with pytest.raises(ValueError, match=r"LoRAPrune: the blocks' group counts differ \(\[\[128\], \[96\], \[128\], \[64\]\]\)"):
        lpm.LoRAPrune(structured_model("gemma3n"), mlp=0.5)
