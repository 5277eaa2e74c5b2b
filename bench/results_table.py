"""Markdown tables from bench JSON results, for bench/RESULTS.md.

    python bench/results_table.py OUT/bench_linear.json OUT/bench_prune.json ... [-o FILE]

Each file ({"run": {...}, "rows": [...]}, see bench/common.py) becomes a section headed by its script,
device, date and commit, with one table per op. Columns are the shared row keys that some row fills,
then the bench's extras. No torch needed: it runs anywhere the JSON was copied to.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (row key, column title); a column shows only when some row of the table has a value for it
KEY_COLUMNS = [("shape", "shape"), ("M", "M"), ("dtype", "dtype"), ("mode", "mode"), ("provider", "provider")]
TIME_UNITS = {"us": "µs", "ms": "ms"}
RATE_COLUMNS = [("tflops", "TFLOP/s"), ("gbps", "GB/s")]
# run keys shown in the section heading or deliberately left out of the notes line
HEADING_KEYS = {"script", "device", "date", "commit", "torch", "cuda", "argv", "backends"}


def load(path: str | Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):  # a bare list of rows
        return {"script": Path(path).stem}, data
    return data.get("run", {"script": Path(path).stem}), data["rows"]


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":")).replace("|", "\\|")
    return str(value).replace("|", "\\|")


def _unit(row: dict) -> str | None:
    return next((u for u in TIME_UNITS if f"time_{u}" in row), None)


def render_op(rows: list[dict]) -> str:
    """One markdown table for the rows of one op (all rows in the same time unit)."""
    columns = [(k, t) for k, t in KEY_COLUMNS if any(r.get(k) is not None for r in rows)]
    unit = _unit(rows[0])
    if unit:
        columns += [(f"time_{unit}", f"time ({TIME_UNITS[unit]})"), (f"p10_{unit}", "p10–p90")]
    columns += [(k, t) for k, t in RATE_COLUMNS if any(r.get(k) is not None for r in rows)]
    extras = list(dict.fromkeys(k for r in rows for k in r.get("extras", {})))
    header = [t for _, t in columns] + extras
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = []
        for key, _ in columns:
            if key.startswith("p10_"):
                cells.append(f"{fmt(r.get(key))}–{fmt(r.get('p90_' + key[4:]))}")
            else:
                cells.append(fmt(r.get(key)))
        cells += [fmt(r.get("extras", {}).get(k)) for k in extras]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(run: dict, rows: list[dict]) -> str:
    """A section: heading with device, date and commit, a notes line, then a table per op."""
    title = run.get("script", "bench")
    lines = [f"### {title} — {run.get('device', '?')}, {run.get('date', '?')}, commit {run.get('commit', '?')}",
             ""]
    versions = ", ".join(f"{k} {run[k]}" for k in ("torch", "cuda") if run.get(k))
    notes = [f"{k}: {fmt(v)}" for k, v in run.items() if k not in HEADING_KEYS]
    if run.get("argv"):
        notes.append("args: `" + " ".join(run["argv"]) + "`")
    if versions or notes:
        lines += ["; ".join(filter(None, [versions] + notes)), ""]
    if not rows:
        lines += ["(no rows)", ""]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    for op in ops:
        lines += [f"#### {op}", "", render_op([r for r in rows if r["op"] == op])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="bench JSON files")
    p.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    args = p.parse_args(argv)
    sections = []
    for path in args.paths:
        if not Path(path).exists():
            print(f"results_table: {path} does not exist (that bench did not run?)", file=sys.stderr)
            continue
        sections.append(render(*load(path)))
    if not sections:
        print("results_table: no result files to render", file=sys.stderr)
        return 1
    text = "\n".join(sections)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
