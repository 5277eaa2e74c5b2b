"""The layer table of bench/RESULTS.md's CPU section from bench_cpu JSON files: one row per (shape, dtype,
threads, provider), one column per M with `vs_dense` (dense row: its time), then the weight bytes vs dense.
Routed layer rows carry `d` (the layer turned dense) or `u` (packed, and dense on a transient copy won this M)
and, in brackets, the ratio against the dense nn.Linear module they replace (`vs_dense_layer`).

    python bench/cpu_table.py OUT/bench_cpu.json [more.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(row: dict) -> str:
    ex = row["extras"]
    if row["provider"] == "dense":
        return f"{row['time_us']:.0f} µs"
    cell = f"{ex['vs_dense']:.2f}x"
    route = ex.get("route")
    if route == "dense layer":
        cell += " d"
    elif route and route.startswith("packed ("):
        cell += " u"
    if "vs_dense_layer" in ex:
        cell += f" ({ex['vs_dense_layer']:.2f}x)"
    return cell


def table(rows: list[dict]) -> str:
    rows = [r for r in rows if r["op"] == "linear_cpu"]
    ms = sorted({r["M"] for r in rows})
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["extras"]["threads"], r["provider"]), {})[r["M"]] = r
    head = ["shape (out x in)", "dtype", "threads", "provider", *[f"M={m}" for m in ms], "weight bytes vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, dtype, threads, provider), by_m in groups.items():
        any_row = next(iter(by_m.values()))
        cells = [_cell(by_m[m]) if m in by_m else "" for m in ms]
        lines.append("| " + " | ".join([shape, dtype, str(threads), provider, *cells,
                                         f"{any_row['extras']['weight_bytes_vs_dense']:.3f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = []
    for path in argv:
        rows += json.loads(Path(path).read_text())["rows"]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
