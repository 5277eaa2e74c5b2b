"""Filter pruning of sequential CNN / MLP chains: remove Conv1d / Conv2d output filters and Linear output
neurons, with the dependent BatchNorm features and input channels of the next Conv / Linear.

The dependencies are read from a torch.fx trace of the model, which must be one chain: every operation
feeds exactly one other. Anything else (residual adds, concatenations, a layer used twice, grouped
convolutions, reshapes other than flatten) is refused with the node that breaks the chain.

Every change is planned (all new tensors built) before the first layer is modified, so an error leaves
the model untouched; shapes are traced in eval mode (BatchNorm statistics do not move) and each
module's training flag is restored.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

log = logging.getLogger("prunekit")

# Operations that act on each channel separately: pruning a channel before them prunes it after them.
CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU,
                       nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d,
                       nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                       nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
CHANNELWISE_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, F.dropout,
                         F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                         F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                         torch.relu, torch.sigmoid, torch.tanh}
CHANNELWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass
class FilterReport:
    """Per pruned layer: its output width before and after, and the kept output indices."""

    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept: dict[str, list[int]] = field(default_factory=dict)
    params: tuple[int, int] = (0, 0)

    def __str__(self) -> str:
        lines = [f"prune_filters: {len(self.widths)} layer(s), parameters {self.params[0]:,} -> "
                 f"{self.params[1]:,} ({self.params[1] / self.params[0] if self.params[0] else 1:.1%})"]
        width = max((len(n) for n in self.widths), default=0)
        lines += [f"  {name.ljust(width)}  {before} -> {after} outputs" for name, (before, after) in self.widths.items()]
        return "\n".join(lines)


@dataclass
class _Link:
    """A prunable layer, the norms after it, and the layer reading its outputs."""

    name: str
    norms: list[tuple[str, bool]] = field(default_factory=list)  # (norm, whether it reads flattened features)
    consumer: str | None = None
    ndim: int = 2
    spread: int = 1  # input features of the consumer per output channel (spatial size after flatten)
    flattened: bool = False


def prune_filters(model: nn.Module, amount: float | str, importance: str = "l1", *,
                  example_input: torch.Tensor) -> FilterReport:
    """Removes `amount` of the output filters / neurons of every Conv1d / Conv2d and Linear but the last,
    in place. amount: a fraction in [0, 1) (0.3) or a percentage ("30%").

    importance: "l1" (Σ|w|) or "l2" (sqrt Σw²) of each filter's weights; the lowest are removed
        (ties: lowest index first). The removed count is rounded to the nearest integer, at least one
        filter stays. example_input: one input batch, used to trace shapes (flatten sizes).
    """
    fraction = _amount(amount)
    if importance not in ("l1", "l2"):
        raise ValueError(f"importance: expected 'l1' or 'l2', got {importance!r}")
    links = _trace_chain(model, example_input)
    report = FilterReport(params=(_n_params(model), 0))
    edits: dict[tuple[nn.Module, str], torch.Tensor] = {}  # planned tensors, composed across links
    widths: list[tuple[nn.Module, dict]] = []
    for link in links:  # plan everything on the dense weights; nothing changes until all is planned
        weight = model.get_submodule(link.name).weight
        width = weight.shape[0]
        keep = width - int(math.floor(fraction * width + 0.5))
        if keep < 1:
            raise ValueError(f"amount={amount!r} would remove every output of {link.name} ({width})")
        if keep < width:
            kept = select_filters(weight, keep, importance).cpu()
            _plan(model, link, kept, edits, widths)
            report.widths[link.name] = (width, keep)
            report.kept[link.name] = kept.tolist()
    with torch.no_grad():
        for (module, attr), value in edits.items():
            _set_tensor(module, attr, value)
        for module, sizes in widths:
            for attr, size in sizes.items():
                setattr(module, attr, size)
    report.params = (report.params[0], _n_params(model))
    log.info("%s", report)
    return report


def _amount(amount) -> float:
    text = amount.strip() if isinstance(amount, str) else None
    try:
        value = float(text[:-1]) / 100.0 if text and text.endswith("%") else float(amount)
    except (TypeError, ValueError):
        raise ValueError(f"amount: expected a fraction in [0, 1) like 0.3 or a percentage like '30%', "
                         f"got {amount!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"amount: expected a fraction in [0, 1) (or a percentage below 100%), got {amount!r}")
    return value


def filter_scores(weight: torch.Tensor, importance: str) -> torch.Tensor:
    w = weight.detach().double().reshape(weight.shape[0], -1)
    return w.abs().sum(1) if importance == "l1" else w.square().sum(1).sqrt()


def select_filters(weight: torch.Tensor, keep: int, importance: str) -> torch.Tensor:
    scores = filter_scores(weight, importance)
    order = torch.sort(scores, stable=True).indices
    return order[scores.numel() - keep:].sort().values


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ tracing
def _trace_chain(model: nn.Module, example_input: torch.Tensor) -> list[_Link]:
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as exc:
        raise ValueError(f"prune_filters: torch.fx cannot trace {type(model).__name__} "
                         f"({type(exc).__name__}: {exc}); it handles plain sequential chains") from None
    training = {module: module.training for module in model.modules()}
    model.eval()  # a probe: BatchNorm running statistics must not move
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_input)
    finally:
        for module, flag in training.items():
            module.training = flag
    nodes = [n for n in graph_module.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    calls = {}
    for node in graph_module.graph.nodes:
        sources = [a for a in node.all_input_nodes]
        if node.op != "placeholder" and len(sources) != 1 or node.op != "output" and len(node.users) != 1:
            raise ValueError(f"prune_filters: {type(model).__name__} is not a sequential chain: node "
                             f"{node.name!r} ({node.op} {_target_name(node)}) reads "
                             f"{_node_list(sources)} and is read by {_node_list(node.users)}"
                             f"{_chain_hint(node)}; prune_filters handles only chains")
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            if calls[node.target] > 1:
                raise ValueError(f"prune_filters: module {node.target!r} is called more than once")

    links: list[_Link] = []
    current: _Link | None = None
    for node in nodes:
        kind = _classify(graph_module, node)
        if kind == "layer":
            if current is not None:
                current.consumer = node.target
                _check_link(graph_module, current)
                links.append(current)
            current = _Link(node.target, ndim=len(node.meta["tensor_meta"].shape))
        elif current is None or kind == "channelwise":
            continue
        elif kind == "norm":
            current.norms.append((node.target, current.flattened))
        elif kind == "flatten":
            if current.flattened:
                raise ValueError(f"prune_filters: {node.name!r} flattens a second time after {current.name}")
            shape = node.all_input_nodes[0].meta["tensor_meta"].shape
            current.spread, current.flattened = math.prod(shape[2:]), True
    return links


def _check_link(graph_module: fx.GraphModule, link: _Link) -> None:
    """Channels must reach the consumer where it reads them: dim 1 of a Conv2d input, or the features
    of a Linear (after flatten when they come from a Conv2d)."""
    producer = type(graph_module.get_submodule(link.name))
    consumer = type(graph_module.get_submodule(link.consumer))
    if producer in CONVS and consumer is nn.Linear and not link.flattened:
        raise ValueError(f"prune_filters: {link.consumer} reads the output of {link.name} without a "
                         f"flatten(start_dim=1) in between")
    if consumer in CONVS and (producer is nn.Linear or link.flattened):
        raise ValueError(f"prune_filters: {link.consumer} ({consumer.__name__}) reads flattened / Linear "
                         f"outputs of {link.name}; not handled")
    if producer in CONVS and consumer in CONVS and producer is not consumer:
        raise ValueError(f"prune_filters: {link.name} ({producer.__name__}) feeds {link.consumer} "
                         f"({consumer.__name__}); not handled")
    if producer is nn.Linear and link.ndim > 2 and (link.norms or link.flattened):
        raise ValueError(f"prune_filters: {link.name} gives a {link.ndim}-D output that is normalized or "
                         f"flattened before {link.consumer}; only 2-D Linear outputs are handled there")


def _node_list(nodes) -> str:
    names = [n.name for n in nodes]
    return "nothing" if not names else f"{len(names)} nodes ({', '.join(names)})" if len(names) > 1 else names[0]


def _chain_hint(node: fx.Node) -> str:
    """What the non-chain node most likely is, said plainly."""
    users = list(node.users)
    reshapes = ("view", "reshape", "size")
    if any(u.op == "call_method" and u.target in reshapes for u in users) or (
            node.op == "call_method" and node.target in reshapes):
        return (" (a view/reshape that reads the tensor's size; use flatten(start_dim=1) or nn.Flatten, "
                "which prune_filters understands)")
    if len(users) > 1:
        return " (its output is used more than once: a skip connection or branch)"
    if len(node.all_input_nodes) > 1:
        return " (it combines several tensors: a residual add or concatenation)"
    return ""


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _classify(graph_module: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if type(module) is nn.Linear:
            return "layer"
        if type(module) in CONVS:
            if module.groups != 1:
                raise ValueError(f"prune_filters: {node.target} is a grouped convolution (groups="
                                 f"{module.groups}); only groups=1 is handled")
            return "layer"
        if isinstance(module, NORMS):
            return "norm"
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return "flatten"
        if isinstance(module, CHANNELWISE_MODULES):
            return "channelwise"
    elif node.op == "call_function":
        if node.target in CHANNELWISE_FUNCTIONS:
            return "channelwise"
        if node.target is torch.flatten and _flatten_from_dim1(node):
            return "flatten"
    elif node.op == "call_method":
        if node.target in CHANNELWISE_METHODS:
            return "channelwise"
        if node.target == "flatten" and _flatten_from_dim1(node):
            return "flatten"
    raise ValueError(f"prune_filters: cannot tell how {node.op} {_target_name(node)!r} (node {node.name!r}) "
                     f"maps channels; supported: Conv1d, Conv2d, Linear, BatchNorm, element-wise activations, "
                     f"pooling, dropout, flatten(start_dim=1)")


def _flatten_from_dim1(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


# ----------------------------------------------------------------------------------- shrinking
def _plan(model: nn.Module, link: _Link, kept: torch.Tensor, edits: dict, widths: list) -> None:
    """Appends the new tensors (and widths) that remove all but `kept` (CPU indices) of `link`'s
    outputs: the layer's rows, its norms' features (by channel before a flatten, by the channel's spread
    columns after it) and its consumer's input columns."""
    columns = (kept[:, None] * link.spread + torch.arange(link.spread)).flatten()
    layer = model.get_submodule(link.name)
    for attr in ("weight", "bias"):
        _sliced(layer, attr, 0, kept, edits)
    widths.append((layer, {"out_features" if isinstance(layer, nn.Linear) else "out_channels": kept.numel()}))
    for name, after_flatten in link.norms:
        norm = model.get_submodule(name)
        index = columns if after_flatten else kept
        if norm.num_features != layer.weight.shape[0] * (link.spread if after_flatten else 1):
            raise ValueError(f"prune_filters: {name} normalizes {norm.num_features} features, but {link.name} "
                             f"gives {layer.weight.shape[0]} channels x {link.spread if after_flatten else 1}")
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _sliced(norm, attr, 0, index, edits)
        widths.append((norm, {"num_features": index.numel()}))
    consumer = model.get_submodule(link.consumer)
    _sliced(consumer, "weight", 1, columns, edits)
    widths.append((consumer, {"in_features" if isinstance(consumer, nn.Linear) else "in_channels": columns.numel()}))


def _sliced(module: nn.Module, attr: str, dim: int, index: torch.Tensor, edits: dict) -> None:
    """Plans `module.attr` sliced along `dim`, on top of what is already planned for it."""
    value = edits.get((module, attr), getattr(module, attr, None))
    if value is None:
        return
    with torch.no_grad():
        edits[(module, attr)] = value.index_select(dim, index.to(value.device)).contiguous()


def _set_tensor(module: nn.Module, attr: str, sliced: torch.Tensor) -> None:
    value = getattr(module, attr)
    if isinstance(value, nn.Parameter):
        setattr(module, attr, nn.Parameter(sliced, requires_grad=value.requires_grad))
    else:
        setattr(module, attr, sliced)  # a registered buffer stays a buffer
