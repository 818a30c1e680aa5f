"""Plots a `kvgate bench cluster --json` report: per setup, fleet-wide reuse, prompt tokens
computed per request, TTFT (p50, p95, p99), requests per node (max / mean) and Redis bytes
read per request, each beside the one-node run where it has one.

Usage: python plot-cluster.py OUT.png REPORT.json
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if len(sys.argv) != 3:
    sys.exit("usage: plot-cluster.py OUT.png REPORT.json")
out, path = sys.argv[1], sys.argv[2]
r = json.load(open(path))
setups = r["setups"]
names = [s["setup"].replace("/", "/\n").replace("+", "+\n") for s in setups]
x = range(len(setups))
fig, axes = plt.subplots(1, 5, figsize=(24, 4.6))
panels = [
    ("reuse of prompt tokens", [s["reuse"] for s in setups], None),
    ("prompt tokens computed / request", [s["computed_per_request"] for s in setups], None),
    ("TTFT (s): p50, p95, p99", None, None),
    ("requests per node: max / mean", [s["max_node_requests"] / max(s["mean_node_requests"], 1e-9) for s in setups], 1.3),
    ("Redis KiB read / request", [s["redis_bytes_per_request"] / 1024 for s in setups], None),
]
for ax, (title, values, line) in zip(axes, panels):
    if values is None:
        w = 0.27
        for k, (q, a) in enumerate([("ttft_p50_s", 1.0), ("ttft_p95_s", 0.7), ("ttft_p99_s", 0.45)]):
            ax.bar([i + (k - 1) * w for i in x], [s[q] for s in setups], w, alpha=a, color="C0", label=q[5:8])
        ax.legend()
    else:
        bars = ax.bar(x, values, color=[f"C{i}" for i in x])
        ax.bar_label(bars, fmt="%.2f" if max(values) < 10 else "%.0f", fontsize=8)
    if line:
        ax.axhline(line, color="red", linestyle="--", linewidth=1, label="target")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, fontsize=7)
    ax.set_title(title)
fig.suptitle(
    f"kvgate bench cluster: {r['nodes']} nodes, {r['clients']} clients, {r['corpus_passages']} passages, "
    f"{r['ram_budget_bytes'] >> 20} MiB RAM tier per node"
)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
