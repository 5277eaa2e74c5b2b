"""Structured pruning of transformer blocks: whole attention heads and MLP channels are removed and the
model physically shrinks (LLM-Pruner style dependency groups, one-shot, no recovery training).

A dependency group is every weight slice that exists only because of one head or one channel:
- an MLP channel j: row j of each up projection (gate_proj and up_proj; fc1; c_fc; intermediate.dense)
  and input column j of the down projection (down_proj; fc2; c_proj; output.dense);
- a key/value group g of grouped-query attention: the rows of its key and value head, the rows of the
  query heads that read it, and the o_proj input columns of those query heads. Removing whole KV groups
  keeps num_attention_heads / num_key_value_heads an integer (for plain multi-head attention a group
  is one head).

Counts are uniform: every block keeps the same number of heads and of MLP channels (each block picks
its own), because a Hugging Face config has one `num_attention_heads` and one `intermediate_size`;
per-block widths could be stored but `from_pretrained` could not read them back. Head pruning needs a
config that names head_dim separately from hidden_size (Llama, Mistral, Qwen2/3, ...): OPT, GPT-2 and
BERT derive head_dim = hidden_size / num_attention_heads, so a model with fewer heads of the same size
cannot be reloaded and is refused (their MLP channels can be pruned).
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tqdm.auto import tqdm

from .. import calibrate, data, reparam
from .._progress import show_progress

log = logging.getLogger("prunekit")

IMPORTANCES = ("l1", "l2", "taylor", "activation")


# ------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Family:
    """Where the prunable groups live inside one block of a model family (paths relative to a block)."""

    name: str
    mlp_up: tuple[str, ...]        # layers whose output rows are MLP channels
    mlp_down: str                  # layer whose input columns are MLP channels
    mlp_config: str                # config field holding the MLP width
    attention: str | None = None   # attention module, when heads can be pruned
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    out: str = "o_proj"
    no_heads: str = ""             # why heads cannot be pruned in this family


_DERIVED = ("its config derives head_dim = hidden_size / num_attention_heads, so a model with fewer "
            "heads could not be reloaded by from_pretrained")
# BERT and GPT-2 once had transformers' own head pruning (model.prune_heads, recorded in
# config.pruned_heads and re-applied by from_pretrained); transformers 5 removed it, so it is not used.
_NO_PRUNED_HEADS = ("; transformers' prune_heads / config.pruned_heads, which re-applied removed heads on "
                    "reload, was removed in transformers 5 and is not used")
FAMILIES = (
    Family("llama", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", "self_attn"),
    Family("gpt2", ("mlp.c_fc",), "mlp.c_proj", "n_inner",
           no_heads="GPT-2 fuses q/k/v into c_attn and " + _DERIVED + _NO_PRUNED_HEADS),
    Family("opt", ("fc1",), "fc2", "ffn_dim", no_heads="OPT: " + _DERIVED),
    Family("bert", ("intermediate.dense",), "output.dense", "intermediate_size", no_heads="BERT: " + _DERIVED + _NO_PRUNED_HEADS),
)


def _has_layer(block: nn.Module, path: str) -> bool:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return False
    return type(module) is nn.Linear or calibrate.is_conv1d(module)


def detect_family(block: nn.Module) -> Family:
    for family in FAMILIES:
        paths = list(family.mlp_up) + [family.mlp_down]
        if family.attention:
            paths += [f"{family.attention}.{p}" for p in (*family.qkv, family.out)]
        if all(_has_layer(block, p) for p in paths):
            return family
    children = ", ".join(name for name, _ in block.named_children())
    raise ValueError(f"prune_structured: unknown architecture: block {type(block).__name__} (children: "
                     f"{children}) matches none of the supported layouts "
                     f"{[f.name for f in FAMILIES]} (gate/up/down_proj, fc1/fc2, c_fc/c_proj, "
                     f"intermediate/output.dense)")


# ------------------------------------------------------------------------------------ groups
@dataclass(frozen=True)
class Slice:
    """One layer's share of every group: on `dim` ("out" rows or "in" columns, nn.Linear layout),
    group g owns the `size` consecutive indices starting at g * size."""

    path: str   # relative to the block
    dim: str
    size: int


@dataclass(frozen=True)
class GroupKind:
    name: str                 # "heads" (KV groups) or "mlp" (channels)
    count: int                # groups per block
    slices: tuple[Slice, ...]
    probe: Slice              # the "in" slice whose input activations measure a group


def group_kinds(family: Family, config, heads: bool, mlp: bool, block: nn.Module) -> list[GroupKind]:
    kinds = []
    if heads:
        n_heads, n_kv, head_dim = _head_counts(family, config, block)
        rep = n_heads // n_kv
        q, k, v = (f"{family.attention}.{p}" for p in family.qkv)
        o = Slice(f"{family.attention}.{family.out}", "in", rep * head_dim)
        kinds.append(GroupKind("heads", n_kv, (Slice(q, "out", rep * head_dim), Slice(k, "out", head_dim),
                                               Slice(v, "out", head_dim), o), o))
    if mlp:
        width = calibrate.layer_weight(block.get_submodule(family.mlp_down)).shape[1]
        down = Slice(family.mlp_down, "in", 1)
        kinds.append(GroupKind("mlp", width, tuple(Slice(p, "out", 1) for p in family.mlp_up) + (down,), down))
    return kinds


def _head_counts(family: Family, config, block: nn.Module) -> tuple[int, int, int]:
    if family.attention is None:
        raise ValueError(f"prune_structured: heads cannot be pruned: {family.no_heads}; use heads=0")
    # Configs without a head_dim field (Qwen2) still read config.head_dim when it is set, and save it.
    head_dim = getattr(config, "head_dim", None) or getattr(block.get_submodule(family.attention), "head_dim", None)
    n_heads = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if not isinstance(head_dim, int) or not n_heads:
        raise ValueError(f"prune_structured: heads cannot be pruned: neither {type(config).__name__} nor "
                         f"the attention module names head_dim; use heads=0")
    q = calibrate.layer_weight(block.get_submodule(f"{family.attention}.{family.qkv[0]}"))
    k = calibrate.layer_weight(block.get_submodule(f"{family.attention}.{family.qkv[1]}"))
    if q.shape[0] != n_heads * head_dim or k.shape[0] != n_kv * head_dim or n_heads % n_kv:
        raise ValueError(f"prune_structured: q/k widths {q.shape[0]}/{k.shape[0]} do not match the config "
                         f"({n_heads} heads, {n_kv} KV heads, head_dim {head_dim})")
    return n_heads, n_kv, head_dim


def _reshaped(weight: torch.Tensor, s: Slice, count: int) -> torch.Tensor:
    """The weight as [count, everything a group owns] (a view when possible)."""
    if s.dim == "out":
        return weight.reshape(count, -1)
    return weight.reshape(weight.shape[0], count, s.size).transpose(0, 1).reshape(count, -1)


def group_scores(weights: list[torch.Tensor], kind: GroupKind, importance: str,
                 grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Importance of each group of one block, from its slices' weights (nn.Linear layout):
    l1 = Σ|w|, l2 = sqrt(Σw²), taylor = Σ|w·∂L/∂w| over all weights the group owns."""
    total = torch.zeros(kind.count, dtype=torch.float64, device=weights[0].device)
    for j, (w, s) in enumerate(zip(weights, kind.slices)):
        w = w.detach().double()
        if importance == "l1":
            term = w.abs()
        elif importance == "l2":
            term = w.square()
        else:
            term = (w * grads[j].double()).abs()
        total += _reshaped(term, s, kind.count).sum(1)
    return total.sqrt() if importance == "l2" else total


def select_kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` most important groups, ascending; ties prune the lowest index first."""
    order = torch.sort(scores, stable=True).indices
    return order[scores.numel() - keep:].sort().values


# ----------------------------------------------------------------------------------- counts
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def kept_heads(n_kv: int, ratio: float) -> int:
    keep = n_kv - _round_half_up(ratio * n_kv)
    if keep < 1:
        raise ValueError(f"heads={ratio}: pruning {n_kv - keep} of {n_kv} key/value groups would remove "
                         f"every attention head; use a ratio below {(n_kv - 0.5) / n_kv:.3f}")
    return keep


def kept_channels(width: int, ratio: float, round_to: int) -> int:
    if round_to > width:
        raise ValueError(f"round_to={round_to} is larger than the MLP width {width}")
    keep = round_to * _round_half_up((width - ratio * width) / round_to)
    return min(max(keep, round_to), width)


def _heads_config_ok(config, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the config class accepts these head counts (transformers 5 validates on save)."""
    trial = copy.deepcopy(config)
    trial.num_attention_heads, trial.num_key_value_heads, trial.head_dim = n_heads, n_kv, head_dim
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception:
        return False
    return True


def _check_heads_config(config, kind: GroupKind, keep: int, ratio: float) -> None:
    n_heads, n_kv, head_dim = _kind_heads(kind)
    rep = n_heads // n_kv
    if _heads_config_ok(config, keep * rep, keep, head_dim):
        return
    ok = [f"{(n_kv - k) / n_kv:g}" for k in range(n_kv - 1, 0, -1) if _heads_config_ok(config, k * rep, k, head_dim)]
    raise ValueError(f"heads={ratio}: {type(config).__name__} rejects {keep * rep} attention heads "
                     f"(hidden_size {getattr(config, 'hidden_size', '?')} must be a multiple of the head "
                     f"count); ratios it accepts: {', '.join(ok) or 'none'}")


def _kind_heads(kind: GroupKind) -> tuple[int, int, int]:
    """(attention heads, KV heads, head_dim) of a "heads" group kind, from its q and k slices."""
    q, k = kind.slices[0], kind.slices[1]
    return kind.count * q.size // k.size, kind.count, k.size


# ----------------------------------------------------------------------------------- report
@dataclass
class StructuredReport:
    """What prune_structured did. `kept[i]` holds block i's kept KV-group and channel indices."""

    family: str
    importance: str
    blocks: str
    heads: tuple[int, int] | None = None       # attention heads per block: before, after
    kv_heads: tuple[int, int] | None = None    # key/value heads per block: before, after
    mlp: tuple[int, int] | None = None         # MLP channels per block: before, after
    params: tuple[int, int] = (0, 0)           # model parameters: before, after
    kept: list[dict[str, list[int]]] = field(default_factory=list)
    seconds: float = 0.0
    removed: dict[str, tuple[float, float]] = field(default_factory=dict)  # kind: (requested, removed) fraction
    notes: list[str] = field(default_factory=list)  # what rounding did to the requested fractions

    @property
    def param_ratio(self) -> float:
        return self.params[1] / self.params[0] if self.params[0] else 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"structured pruning ({self.family}, importance={self.importance}) of {self.blocks}:"]
        for name in ("heads", "kv_heads", "mlp"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} {value[0]} -> {value[1]}")
        parts.append(f"params {self.params[0]:,} -> {self.params[1]:,} ({self.param_ratio:.1%}) "
                     f"in {self.seconds:.2f} s")
        return "\n".join([" ".join(parts), *(f"note: {n}" for n in self.notes)])


# ----------------------------------------------------------------------------------- public
def prune_structured(model: nn.Module, *, heads: float = 0.0, mlp: float = 0.0, importance: str = "l2",
                     calibration=None, blocks: str | None = None, round_to: int = 1,
                     batch_size: int = 1, progress: bool | None = None) -> StructuredReport:
    """Removes a fraction of the attention heads and MLP channels of every block, in place.

    heads: fraction of key/value groups to remove per block (a KV head with the query heads that
        read it; one head for plain multi-head attention), rounded to the nearest whole group.
    mlp: fraction of MLP channels to remove per block; the kept width is rounded to the nearest
        multiple of `round_to` (e.g. 8 or 64 for tensor-core friendly widths).
    importance: "l1" (Σ|w|) or "l2" (sqrt Σw²) over all weights of a group; "taylor": Σ|w·∂L/∂w|
        with the gradient of the LM loss summed over the calibration batches (needs a model with an
        LM head); "activation": mean |input| of the group's down/o_proj input columns over the
        calibration tokens, summed over the group.
    calibration: token ids [n_samples, seq_len] or a list of batches (see prunekit.data), needed by
        "taylor" and "activation".
    blocks: dotted name of the block list when it cannot be discovered.
    progress: a tqdm bar over the calibration batches (default: only on a terminal).

    Rounding (whole groups, `round_to`) can remove more or less than asked: the report's `removed` and
    `notes` say what was removed, and a difference of a percentage point or more is also a warning.

    Every block keeps the same counts (each its own groups), so the updated config describes the
    model and save_pretrained / from_pretrained round-trip. Returns a StructuredReport.
    """
    start = time.perf_counter()
    heads_ratio = _ratio(heads, "heads")
    mlp_ratio = _ratio(mlp, "mlp")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance: expected one of {IMPORTANCES}, got {importance!r}")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"round_to: expected a positive integer, got {round_to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    found = calibrate.find_blocks(model, blocks)
    if found is None:
        raise ValueError(f"prune_structured: {type(model).__name__} has no list of transformer blocks; "
                         f"name it with blocks=...")
    block_path, block_list = found
    family = detect_family(block_list[0])
    config = _text_config(model)
    kinds = group_kinds(family, config, heads_ratio > 0, mlp_ratio > 0, block_list[0])
    report = StructuredReport(family=family.name, importance=importance, blocks=block_path,
                              params=(_n_params(model), 0))
    keeps = _plan(kinds, family, config, heads_ratio, mlp_ratio, round_to, report)
    if not keeps:
        log.info("prune_structured: nothing to prune (heads=%s, mlp=%s)", heads, mlp)
        report.params = (report.params[0], report.params[0])
        return report

    reparam.plain_weights({f"{block_path}.{n}": m for n, m in block_list.named_modules()
                           if calibrate.is_prunable(m)}, "prune_structured")
    scores = _importances(model, block_list, kinds, importance, calibration, batch_size, progress)
    for index, block in enumerate(block_list):
        kept = {}
        for kind in kinds:
            if kind.name in keeps:
                chosen = select_kept(scores[index][kind.name], keeps[kind.name])
                _shrink(block, kind, chosen)
                kept[kind.name] = chosen.tolist()
        report.kept.append(kept)
    _update_config(model, block_list, family, config, kinds, keeps, report)
    report.params = (report.params[0], _n_params(model))
    report.seconds = time.perf_counter() - start
    log.info("%s", report)
    return report


def _ratio(value, name: str) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a fraction in [0, 1), got {value!r}") from None
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    return r


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"prune_structured: {type(model).__name__} has no Hugging Face config; structured "
                         f"pruning updates the config so the model can be saved and reloaded")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plan(kinds, family, config, heads_ratio, mlp_ratio, round_to, report) -> dict[str, int]:
    """Groups to keep per block, by kind; checked against the config before anything changes. What
    rounding did to each requested fraction goes to the report (and a warning when it is far off)."""
    keeps = {}
    for kind in kinds:
        if kind.name == "heads":
            ratio = heads_ratio
            keep = kept_heads(kind.count, heads_ratio)
            _check_heads_config(config, kind, keep, heads_ratio)
            unit = "key/value head groups"
        else:
            ratio = mlp_ratio
            keep = kept_channels(kind.count, mlp_ratio, round_to)
            unit = "MLP channels" + (f" (kept width a multiple of round_to={round_to})" if round_to > 1 else "")
        removed = (kind.count - keep) / kind.count
        report.removed[kind.name] = (ratio, removed)
        if abs(removed - ratio) > 1e-9:
            note = (f"{'heads' if kind.name == 'heads' else 'mlp'}={ratio:g} of {kind.count} {unit} rounds to "
                    f"removing {kind.count - keep} ({removed:.3g} instead of {ratio:g}) per block")
            report.notes.append(note)
            if abs(removed - ratio) >= 0.01:
                warnings.warn(f"prune_structured: {note}", stacklevel=3)
            log.info("prune_structured: %s", note)
        if keep < kind.count:
            keeps[kind.name] = keep
    return keeps


# ------------------------------------------------------------------------------- importance
def _importances(model, block_list, kinds, importance, calibration, batch_size,
                 progress=None) -> list[dict[str, torch.Tensor]]:
    grads = activations = None
    if importance in ("taylor", "activation"):
        if calibration is None:
            raise ValueError(f"importance={importance!r} needs calibration data (token ids or batches)")
        batches = data.as_batches(calibration, batch_size=batch_size, max_len=data.max_positions(model),
                                  vocab=data.vocab_size(model))
        batches = tqdm(batches, desc=f"prunekit {importance} importance", unit="batch",
                       disable=not show_progress(progress))
        if importance == "taylor":
            grads = _loss_gradients(model, block_list, kinds, batches)
        else:
            activations = _input_activations(model, block_list, kinds, batches)
    scores = []
    for index, block in enumerate(block_list):
        per_kind = {}
        for kind in kinds:
            if activations is not None:
                mean_abs = activations[(index, kind.probe.path)]
                per_kind[kind.name] = mean_abs.reshape(kind.count, kind.probe.size).sum(1)
            else:
                weights = [calibrate.layer_weight(block.get_submodule(s.path)) for s in kind.slices]
                g = [grads[(index, s.path)] for s in kind.slices] if grads is not None else None
                per_kind[kind.name] = group_scores(weights, kind, importance, g)
        scores.append(per_kind)
    return scores


def _layers(block_list, kinds, probes_only: bool = False) -> dict[tuple[int, str], nn.Module]:
    out = {}
    for index, block in enumerate(block_list):
        for kind in kinds:
            for s in ((kind.probe,) if probes_only else kind.slices):
                out[(index, s.path)] = block.get_submodule(s.path)
    return out


def _loss_gradients(model, block_list, kinds, batches) -> dict[tuple[int, str], torch.Tensor]:
    """∂(LM loss)/∂W in nn.Linear layout, summed over the calibration batches, for every group layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"importance='taylor' needs the gradient of a language-modelling loss, and "
                         f"{type(model).__name__} has no LM head; use 'l1', 'l2' or 'activation'")
    layers = _layers(block_list, kinds)
    device = calibrate.model_device(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}  # the caller's gradients come back untouched
    sums = {key: torch.zeros(calibrate.layer_weight(m).shape, dtype=torch.float32, device=device)
            for key, m in layers.items()}
    with calibrate.kept_modes(model, train=False):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for m in layers.values():
                m.weight.requires_grad_(True)
                m.weight.grad = None
            with torch.enable_grad():
                for batch in batches:
                    batch = calibrate.to_device(batch, device)
                    if "labels" not in batch:
                        if "input_ids" not in batch:
                            raise ValueError("importance='taylor': a calibration batch has neither labels "
                                             "nor input_ids to use as labels")
                        batch["labels"] = batch["input_ids"]
                    out = model(**batch, **calibrate.forward_kwargs(model))
                    loss = out.loss if hasattr(out, "loss") else out[0]
                    loss.backward()
                    for key, m in layers.items():
                        if m.weight.grad is not None:
                            g = m.weight.grad.t() if calibrate.is_conv1d(m) else m.weight.grad
                            sums[key] += g.float()
                            m.weight.grad = None
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = grads[p]
    return sums


def _input_activations(model, block_list, kinds, batches) -> dict[tuple[int, str], torch.Tensor]:
    """Mean |x| per input feature of each probe layer (o_proj, down_proj) over calibration tokens."""
    probes = _layers(block_list, kinds, probes_only=True)
    device = calibrate.model_device(model)
    sums = {key: torch.zeros(calibrate.in_features(m), dtype=torch.float64, device=device)
            for key, m in probes.items()}
    tokens = {key: 0 for key in probes}

    def hook(key):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, sums[key].numel())
            sums[key] += x.abs().sum(0, dtype=torch.float64)
            tokens[key] += x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(key)) for key, m in probes.items()]
    try:
        with torch.no_grad(), calibrate.kept_modes(model, train=False):
            for batch in batches:
                model(**calibrate.to_device(batch, device), **calibrate.forward_kwargs(model))
    finally:
        for h in handles:
            h.remove()
    return {key: sums[key] / max(tokens[key], 1) for key in probes}


# --------------------------------------------------------------------------------- shrinking
def _indices(kept: torch.Tensor, size: int) -> torch.Tensor:
    return (kept[:, None] * size + torch.arange(size, device=kept.device)).flatten()


def _shrink(block: nn.Module, kind: GroupKind, kept: torch.Tensor) -> None:
    for s in kind.slices:
        layer = block.get_submodule(s.path)
        index = _indices(kept, s.size).to(layer.weight.device)
        if s.dim == "out":
            _keep_outputs(layer, index)
        else:
            _keep_inputs(layer, index)


def _set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Installs a new weight given in nn.Linear layout and updates the layer's size attributes."""
    requires_grad = layer.weight.requires_grad
    if calibrate.is_conv1d(layer):
        layer.weight = nn.Parameter(weight.t().contiguous(), requires_grad=requires_grad)
        layer.nx, layer.nf = weight.shape[1], weight.shape[0]
    else:
        layer.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
        layer.out_features, layer.in_features = weight.shape


def _keep_outputs(layer: nn.Module, index: torch.Tensor) -> None:
    with torch.no_grad():
        weight = calibrate.layer_weight(layer).index_select(0, index)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.index_select(0, index), requires_grad=layer.bias.requires_grad)
    _set_weight(layer, weight)


def _keep_inputs(layer: nn.Module, index: torch.Tensor) -> None:
    with torch.no_grad():
        weight = calibrate.layer_weight(layer).index_select(1, index)
    _set_weight(layer, weight)


def _update_config(model, block_list, family, config, kinds, keeps, report) -> None:
    """Writes the new widths into the config and into attributes modules copied from it."""
    for kind in kinds:
        if kind.name not in keeps:
            continue
        keep = keeps[kind.name]
        if kind.name == "heads":
            n_heads, n_kv, head_dim = _kind_heads(kind)
            rep = n_heads // n_kv
            config.num_attention_heads, config.num_key_value_heads = keep * rep, keep
            config.head_dim = head_dim  # explicit, or from_pretrained would derive hidden_size / heads
            report.heads, report.kv_heads = (n_heads, keep * rep), (n_kv, keep)
            for block in block_list:
                attention = block.get_submodule(family.attention)
                for attr, value in (("num_heads", keep * rep), ("num_attention_heads", keep * rep),
                                    ("num_key_value_heads", keep)):
                    if isinstance(getattr(attention, attr, None), int):
                        setattr(attention, attr, value)
        else:
            setattr(config, family.mlp_config, keep)
            report.mlp = (kind.count, keep)
            parent = family.mlp_down.rpartition(".")[0]
            for block in block_list:
                owner = block.get_submodule(parent) if parent else block
                for attr in ("intermediate_size", "ffn_dim"):
                    if isinstance(getattr(owner, attr, None), int):
                        setattr(owner, attr, keep)
