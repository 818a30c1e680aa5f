"""Plots `kvgate bench rag --json` output: TTFT and quality against the recompute budget.

Usage: python plot-rag.py REPORT.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

report = json.load(open(sys.argv[1]))
rows = report["results"]
compose = sorted((r for r in rows if r["mode"] == "compose"), key=lambda r: r["budget"])
off = next(r for r in rows if r["label"] == "off")
prefix = next((r for r in rows if r["mode"] == "prefix"), None)
budgets = [100 * r["budget"] for r in compose]

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
ax1.plot(budgets, [1e3 * r["ttft_p50_s"] for r in compose], "o-", label="compose p50")
ax1.plot(budgets, [1e3 * r["ttft_p95_s"] for r in compose], "o--", alpha=0.6, label="compose p95")
ax1.axhline(1e3 * off["ttft_p50_s"], color="black", linestyle=":", label="off p50")
if prefix:
    ax1.axhline(1e3 * prefix["ttft_p50_s"], color="grey", linestyle="-.", label="prefix p50")
ax1.set_xlabel("recompute budget (% of reused tokens)")
ax1.set_ylabel("TTFT (ms)")
ax1.set_ylim(bottom=0)
ax1.set_title(f"TTFT, k={report['k']} passages, ~{report['mean_prompt_tokens']:.0f} prompt tokens")
ax1.legend()

ax2.plot(budgets, [100 * r["first_token_agreement"] for r in compose], "o-", label="first token = off")
ax2.plot(budgets, [100 * r["identical_first_n"] for r in compose], "s-",
         label=f"first {report['max_tokens']} tokens = off")
if prefix:
    ax2.axhline(100 * prefix["identical_first_n"], color="grey", linestyle="-.",
                label="prefix (exact reuse): first-N = off")
ax2.set_xlabel("recompute budget (% of reused tokens)")
ax2.set_ylabel("% of requests")
ax2.set_ylim(0, 105)
ax3 = ax2.twinx()
ax3.plot(budgets, [r["mean_kl"] for r in compose], "^:", color="tab:red", label="mean KL vs off")
ax3.set_ylabel("mean KL (nats)", color="tab:red")
ax2.set_title("quality against full recompute (greedy)")
lines = ax2.get_legend_handles_labels()
lines3 = ax3.get_legend_handles_labels()
ax2.legend(lines[0] + lines3[0], lines[1] + lines3[1], loc="lower right", fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print(f"plot written to {sys.argv[2]}")
