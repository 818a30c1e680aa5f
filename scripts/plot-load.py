"""Plots `kvgate bench load --json` reports against the number of concurrent clients: TTFT
(p50 and p95), inter-token latency (p50 and p99), requests/s and output tokens/s, one line
per report (e.g. kvgate, kvgate with one running sequence, llama.cpp's server).

Usage: python plot-load.py OUT.png REPORT.json [REPORT.json ...]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, paths = sys.argv[1], sys.argv[2:]
if not paths:
    sys.exit("usage: plot-load.py OUT.png REPORT.json [REPORT.json ...]")
reports = [json.load(open(p)) for p in paths]
fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
for r in reports:
    c = [l["clients"] for l in r["levels"]]
    line = axes[0].plot(c, [l["ttft_p50_s"] for l in r["levels"]], "o-", label=f"{r['label']} p50")[0]
    axes[0].plot(c, [l["ttft_p95_s"] for l in r["levels"]], "o--", color=line.get_color(), alpha=0.6,
                 label=f"{r['label']} p95")
    axes[1].plot(c, [1e3 * l["itl_p50_s"] for l in r["levels"]], "o-", color=line.get_color(),
                 label=f"{r['label']} p50")
    axes[1].plot(c, [1e3 * l["itl_p99_s"] for l in r["levels"]], "o--", color=line.get_color(), alpha=0.6,
                 label=f"{r['label']} p99")
    axes[2].plot(c, [l["requests_per_s"] for l in r["levels"]], "o-", color=line.get_color(), label=r["label"])
    axes[3].plot(c, [l["output_tokens_per_s"] for l in r["levels"]], "o-", color=line.get_color(),
                 label=r["label"])
trace = reports[0]["trace"]
titles = [f"TTFT ({trace} trace)", "inter-token latency", "requests/s", "output tokens/s"]
ylabels = ["seconds", "ms", "requests/s", "tokens/s"]
for ax, title, yl in zip(axes, titles, ylabels):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({l["clients"] for r in reports for l in r["levels"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel(yl)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"plot written to {out}")
