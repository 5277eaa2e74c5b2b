"""Distributed pruning on CPU (issue 15): blocks/s of prunekit.prune with 1 vs 2 processes (gloo), and
the per-layer costs that predict the scaling on N ranks.

    python bench/bench_distributed.py [--repeats 3] [--blocks 4] [--hidden 512] [--out bench/results]

Cases, each timed as the wall time of the pk.prune call on rank 0 (after a barrier; process start-up and
imports excluded), median of --repeats runs, the two main cases interleaved in the same processes:
  1 process, 1 thread | 2 processes x 1 thread (gloo) | with --two-threads: 1 process, 2 threads
for SparseGPT 50% and Wanda 50% on a random-weight Llama of --blocks blocks (hidden --hidden, MLP 2.6875x,
--samples x --seq-len calibration tokens, fp32). The single-process report gives each layer's pruning
seconds; the rest of the run is calibration (forwards + statistics + error pass). From them the script
predicts the time on N ranks as calibration/N + the largest per-rank sum of the pruning seconds under
prunekit's own assignment (prunekit.distributed.partition), and prints the same split for Llama-7B /
70B-shaped blocks from the cost model (multiply-adds; no timing). Only ratios mean anything on a shared
machine: the load average is recorded before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import common  # noqa: E402
METHODS = ("sparsegpt", "wanda")
SINGLE, DISTRIBUTED = "1 process x 1 thread", "2 processes x 1 thread"


def _model(args):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                            num_hidden_layers=args.blocks, num_attention_heads=8, num_key_value_heads=8,
                            vocab_size=1000, max_position_embeddings=args.seq_len, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(config).eval()


def _calibration(args):
    return torch.randint(0, 1000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))


def _method(name):
    import prunekit as pk

    return pk.SparseGPT(0.5) if name == "sparsegpt" else pk.Wanda(0.5)


def _time_prune(args, name, distributed):
    import prunekit as pk

    model, calib = _model(args), _calibration(args)
    if distributed:
        torch.distributed.barrier()
    began = time.perf_counter()
    report = pk.prune(model, _method(name), calib, progress=False, distributed=distributed)
    return time.perf_counter() - began, report


def _rank_main(rank, world, port, args, out):
    """Both cases in the same 2 processes, interleaved (single, distributed, single, ...) so that both
    see the same load: rank 0 alone runs the single-process case while rank 1 waits at a barrier."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    results = {SINGLE: {}, DISTRIBUTED: {}}
    for name in METHODS:
        runs = {SINGLE: [], DISTRIBUTED: []}
        for i in range(args.repeats + 1):  # the first round warms up
            torch.distributed.barrier()
            if rank == 0:
                runs[SINGLE].append(_time_prune(args, name, False))
            torch.distributed.barrier()
            runs[DISTRIBUTED].append(_time_prune(args, name, True))
            if i == 0:
                runs = {SINGLE: [], DISTRIBUTED: []}
        for case in (SINGLE, DISTRIBUTED):
            if runs[case]:
                results[case][name] = {"seconds": [s for s, _ in runs[case]], "report": runs[case][-1][1].to_dict()}
    torch.distributed.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def _single(args, threads):
    torch.set_num_threads(threads)
    results = {}
    for name in METHODS:
        _time_prune(args, name, False)
        runs = [_time_prune(args, name, False) for _ in range(args.repeats)]
        results[name] = {"seconds": [s for s, _ in runs], "report": runs[-1][1].to_dict()}
    return results


def _spin(rank, seconds, out):
    """Busy single-thread matmuls for `seconds`; writes how many it did."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)
        done += 1
    with open(f"{out}.{rank}", "w") as f:
        f.write(str(done))


def _capacity(seconds=4.0):
    """Control: the work 2 independent 1-thread processes get done in the same time as 1 (2.0 on an idle
    2-core machine; less when other work shares the cores)."""
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = os.path.join(tmp, f"spin{n}")
            torch.multiprocessing.start_processes(_spin, args=(seconds, out), nprocs=n, join=True,
                                                  start_method="spawn")
            counts[n] = sum(int(open(f"{out}.{r}").read()) for r in range(n))
    return counts[2] / counts[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _groups(report):
    """Per-layer pruning seconds grouped as prunekit groups them (layers reading one input)."""
    shared = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
    blocks: dict[str, dict[tuple, float]] = {}
    for row in report["layers"]:
        block, _, leaf = row["name"].rpartition(".")
        key = next(g for g in shared if leaf in g)
        blocks.setdefault(block.rsplit(".", 1)[0], {}).setdefault(key, 0.0)
        blocks[block.rsplit(".", 1)[0]][key] += row["seconds"]
    return blocks


def _predict(report, seconds, n):
    from prunekit.distributed.partition import makespan

    blocks = _groups(report)
    prune = sum(sum(g.values()) for g in blocks.values())
    calib = max(seconds - prune, 0.0)
    return calib / n + sum(makespan(list(g.values()), n) for g in blocks.values()), calib, prune


def _cost_model_lines():
    from prunekit.distributed.partition import group_cost, makespan

    lines = []
    for label, h, kv, inter in (("Llama-7B", 4096, 4096, 11008), ("Llama-2-70B", 8192, 1024, 28672)):
        groups = {"q/k/v": group_cost([(h, h), (kv, h), (kv, h)], True), "o": group_cost([(h, h)], True),
                  "gate/up": group_cost([(inter, h)] * 2, True), "down": group_cost([(h, inter)], True)}
        total = sum(groups.values())
        share = ", ".join(f"{k} {v / total:.0%}" for k, v in groups.items())
        bound = " ".join(f"N={n}: {total / makespan(list(groups.values()), n):.2f}x" for n in (2, 4, 8))
        lines.append(f"{label} SparseGPT block, multiply-adds by group: {share}; pruning speed-up bound {bound}")
    return lines


def _load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(BENCH_DIR / "results"))
    parser.add_argument("--two-threads", action="store_true",
                        help="also time 1 process x 2 threads (on a loaded machine it measures the scheduler)")
    args = parser.parse_args(argv)
    run = {"cpu": common.cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "commit": common.commit(),
           "args": vars(args), "load_before": _load(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    run["capacity_before"] = _capacity()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), args, out), nprocs=2,
                                              join=True, start_method="spawn")
        with open(out) as f:
            cases = json.load(f)
    if args.two_threads:
        cases["1 process x 2 threads"] = _single(args, 2)
    run["capacity_after"] = _capacity()
    run["load_after"] = _load()
    rows, lines = [], []
    base = SINGLE
    for name in METHODS:
        ref = statistics.median(cases[base][name]["seconds"])
        for case, result in cases.items():
            sec = statistics.median(result[name]["seconds"])
            rows.append({"method": name, "case": case, "seconds": sec, "all": result[name]["seconds"],
                         "blocks_per_s": args.blocks / sec, "vs_1x1": ref / sec,
                         "distributed": result[name]["report"].get("distributed")})
            lines.append(f"| {name} | {case} | {sec:.2f} | {args.blocks / sec:.3f} | {ref / sec:.2f}x |")
        predicted = {n: _predict(cases[base][name]["report"], ref, n) for n in (1, 2, 4, 8)}
        calib, prune = predicted[1][1], predicted[1][2]
        for r in cases["2 processes x 1 thread"][name]["report"]["distributed"]["ranks"]:
            lines.append(f"| {name} | 2 processes: rank {r['rank']} | {r['layers_pruned']} layers pruned in "
                         f"{r['prune_seconds']:.2f} s, {r['wait_seconds']:.2f} s waiting at {r['syncs']} sync "
                         f"points, {r['comm_seconds']:.2f} s in collectives, of {r['seconds']:.2f} s; peak host memory {r['peak_host_bytes'] / 2**20:.0f} MiB | | |")
        by_group: dict = {}
        for groups in _groups(cases[base][name]["report"]).values():
            for key, sec in groups.items():
                by_group["/".join(k.split("_")[0] for k in key)] = by_group.get("/".join(k.split("_")[0] for k in key), 0.0) + sec
        share = ", ".join(f"{k} {v / max(prune, 1e-9):.0%}" for k, v in by_group.items())
        lines.append(f"| {name} | split of the 1x1 run | calibration {calib:.2f} s, pruning {prune:.2f} s "
                     f"({share}) | | |")
        lines.append(f"| {name} | predicted from per-layer costs | "
                     + ", ".join(f"N={n}: {ref / predicted[n][0]:.2f}x" for n in (2, 4, 8)) + " | | |")
    header = ["| method | case | seconds (median) | blocks/s | vs 1 process x 1 thread |", "|---|---|---|---|---|"]
    text = "\n".join([f"CPU {run['cpu']} ({run['cores']} cores), torch {run['torch']}, commit {run['commit']}, "
                      f"{run['started']}, load average before {run['load_before']}, after {run['load_after']}; "
                      f"control: 2 independent 1-thread processes did {run['capacity_before']:.2f}x (before) / "
                      f"{run['capacity_after']:.2f}x (after) the matmuls of 1 in the same time (2.00 on idle cores)",
                      *header, *lines, *_cost_model_lines()])
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "bench_distributed.json", "w") as f:
        json.dump({"run": run, "rows": rows}, f, indent=1)
    with open(Path(args.out) / "bench_distributed.md", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
