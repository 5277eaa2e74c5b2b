"""What a pruning run did, per layer and in total: a printable table and a JSON file."""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field


def private_name(folder: str, prefix: str, suffix: str = "") -> str:
    """A fresh path in `folder` for a temporary file or folder (random, so runs never collide)."""
    return os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")


def open_new(path: str):
    """Creates `path` (which must not exist) for writing with the mode a normal file gets: 0o666 less
    the process umask, applied by the OS (never read or changed here: os.umask is process-wide)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return os.fdopen(fd, "w", encoding="utf-8")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]         # [out_features, in_features]
    pattern: str                   # "0.5" or "2:4"
    sparsity: float                # fraction of the weight that is zero after pruning
    error: float | None            # ||x W_dense^T - x W_pruned^T||^2 summed over calibration tokens
    #                                (None: pruned without calibration data, so not measured)
    seconds: float                 # time the method spent on this layer
    damping: float | None = None   # SparseGPT: damping that made the Hessian positive definite
    notes: list[str] = field(default_factory=list)
    refine: list[dict] = field(default_factory=list)  # per refinement step: step, error_before/after, seconds, changed

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class PruneReport:
    method: str
    pattern: str
    layers: list[LayerReport] = field(default_factory=list)
    blocks: str | None = None      # dotted path of the block list the pipeline walked, if any
    seconds: float = 0.0           # wall time of the whole run
    skipped: list[dict] = field(default_factory=list)   # {name, shape, reason}: weights left dense
    warnings: list[str] = field(default_factory=list)   # what the run warned about (also warnings.warn)
    # SparseGPT(quant=...): each layer's scales and integer zero-points (prunekit.quant.QuantParams);
    # the layer's weight lies exactly on that grid (codes: report.quant[name].codes(weight)).
    quant: dict = field(default_factory=dict)
    # A distributed run (prunekit.distributed): world size, backend and per-rank figures (batches,
    # layers pruned, seconds, peak device and host memory); None for a single process.
    distributed: dict | None = None

    @property
    def sparsity(self) -> float:
        """Pruned fraction over all pruned layers' weights."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.sparsity * layer.numel for layer in self.layers) / total if total else 0.0

    @property
    def error(self) -> float | None:
        measured = [layer.error for layer in self.layers if layer.error is not None]
        return sum(measured) if measured or not self.layers else None

    @property
    def prune_seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        """JSON-ready; quantization grids appear as their bits and group size (the tensors stay in
        `quant`)."""
        return {"method": self.method, "pattern": self.pattern, "blocks": self.blocks,
                "seconds": self.seconds,
                "totals": {"layers": len(self.layers), "sparsity": self.sparsity, "error": self.error,
                           "prune_seconds": self.prune_seconds},
                "layers": [asdict(layer) for layer in self.layers],
                "skipped": list(self.skipped), "warnings": list(self.warnings),
                "quant": {name: {"bits": q.bits, "groupsize": q.groupsize} for name, q in self.quant.items()},
                "distributed": self.distributed}

    @classmethod
    def from_dict(cls, d: dict) -> PruneReport:
        layers = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in d["layers"]]
        return cls(d["method"], d["pattern"], layers, d.get("blocks"), d.get("seconds", 0.0),
                   list(d.get("skipped", [])), list(d.get("warnings", [])), distributed=d.get("distributed"))

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes the report atomically (a temporary file renamed into place)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        tmp = private_name(folder, ".report-", ".json")
        try:
            with open_new(tmp) as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> PruneReport:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __str__(self) -> str:
        header = ("layer", "shape", "pattern", "sparsity", "error", "damping", "seconds")
        rows = [(layer.name, "x".join(map(str, layer.shape)), layer.pattern, f"{layer.sparsity:.4f}",
                 _num(layer.error), "-" if layer.damping is None else f"{layer.damping:.3g}",
                 f"{layer.seconds:.3f}") for layer in self.layers]
        rows.append(("total", f"{len(self.layers)} layers", self.pattern, f"{self.sparsity:.4f}",
                     _num(self.error), "", f"{self.prune_seconds:.3f}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells) -> str:  # first column left-aligned, numbers right-aligned
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(line(header))
        notes = [f"note: {layer.name}: {n.removeprefix(layer.name + ': ')}"
                 for layer in self.layers for n in layer.notes]
        notes += [f"not pruned: {s['name']} {s['shape']}: {s['reason']}" for s in self.skipped]
        notes += [f"warning: {w}" for w in self.warnings]
        return "\n".join([f"{self.method} pruning, {self.seconds:.1f} s", line(header), rule,
                          *map(line, rows[:-1]), rule, line(rows[-1]), *self._refine_lines(),
                          *self._distributed_lines(), *notes])

    def _distributed_lines(self) -> list[str]:
        """One line per rank of a distributed run: its share of the work and its peak memory."""
        if not self.distributed:
            return []

        def mib(n) -> str:
            return "-" if n is None else f"{n / 2**20:.0f} MiB"

        d = self.distributed
        lines = [f"distributed over {d['world_size']} ranks ({d['backend']}):"]
        for r in d["ranks"]:
            lines.append(f"  rank {r['rank']}: {r['batches']} batches, {r['layers_pruned']} layers pruned in "
                         f"{r['prune_seconds']:.2f} s, {r['wait_seconds']:.2f} s waiting, {r['comm_seconds']:.2f} s "
                         f"in collectives; peak device {mib(r['peak_device_bytes'])}, host {mib(r['peak_host_bytes'])}")
        return lines

    def _refine_lines(self) -> list[str]:
        """One line per refinement step: its error change summed over layers (on each layer's
        calibration statistics) and its time."""
        steps: dict[str, list[float]] = {}
        for layer in self.layers:
            for r in layer.refine:
                total = steps.setdefault(r["step"], [0.0, 0.0, 0.0, 0])
                total[0] += r["error_before"]
                total[1] += r["error_after"]
                total[2] += r["seconds"]
                total[3] += r["changed"]
        return [f"refine {step}: error {b:.4g} -> {a:.4g} ({100 * (a - b) / b if b else 0.0:+.1f}%), "
                f"{int(c)} changed, {sec:.3f} s" for step, (b, a, sec, c) in steps.items()]

    def plot(self, path: str | os.PathLike) -> None:
        """A PNG of per-layer sparsity and reconstruction error (needs matplotlib). Draws on a standalone
        Figure: the caller's matplotlib backend and pyplot state are left alone."""
        try:
            import matplotlib  # noqa: F401  (first: a missing package must say so even if a submodule is cached)
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("plotting the report needs matplotlib: pip install 'prunekit[plot]'") from None
        x = range(len(self.layers))
        fig = Figure(figsize=(max(6, 0.25 * len(self.layers)), 6))
        top, bottom = fig.subplots(2, 1, sharex=True)
        top.bar(x, [layer.sparsity for layer in self.layers])
        top.set_ylabel("sparsity")
        top.set_title(f"per-layer sparsity and reconstruction error\n{self.method}", fontsize=9)
        bottom.bar(x, [layer.error or 0.0 for layer in self.layers], color="tab:red")
        bottom.set_ylabel("error")
        bottom.set_yscale("symlog")
        bottom.set_xticks(list(x), [layer.name for layer in self.layers], rotation=90, fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
