"""Plots `kvgate bench rag --json` output: per trace shape, TTFT and quality against the
recompute budget, the reuse each mode achieves beside the oracle, and the quality/speed
frontier (TTFT against teacher-forced KL, one point per configuration, with off, prefix and
the f16 floor marked).

Usage: python plot-rag.py REPORT.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

report = json.load(open(sys.argv[1]))
traces = report["traces"]
fig, axes = plt.subplots(len(traces), 4, figsize=(20, 3.8 * len(traces)), squeeze=False)
for row, t in zip(axes, traces):
    rows = t["results"]
    compose = sorted((r for r in rows if r["mode"] == "compose" and not r.get("selector")), key=lambda r: r["budget"])
    if not compose:  # every compose run swapped a selector: plot the first one's curve
        first = next((r["selector"] for r in rows if r["mode"] == "compose"), None)
        compose = sorted((r for r in rows if r.get("selector") == first and r["mode"] == "compose"),
                         key=lambda r: r["budget"])
    off = next(r for r in rows if r["label"] == "off")
    prefix = next((r for r in rows if r["mode"] == "prefix" and "floor" not in r["label"]), None)
    budgets = [100 * r["budget"] for r in compose]
    name = t["shape"]

    ax = row[0]
    ax.plot(budgets, [1e3 * r["ttft_p50_s"] for r in compose], "o-", label="compose p50")
    ax.plot(budgets, [1e3 * r["ttft_p95_s"] for r in compose], "o--", alpha=0.6, label="compose p95")
    ax.axhline(1e3 * off["ttft_p50_s"], color="black", linestyle=":", label="off p50")
    if prefix:
        ax.axhline(1e3 * prefix["ttft_p50_s"], color="grey", linestyle="-.", label="prefix p50")
    ax.set_xlabel("recompute budget (% of reused tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{name}: TTFT, ~{t['mean_prompt_tokens']:.0f} prompt tokens")
    ax.legend(fontsize=8)

    ax = row[1]
    labels = [r["label"] for r in rows if r["mode"] != "off"]
    reused = [100 * r["token_hit_rate"] for r in rows if r["mode"] != "off"]
    ax.barh(labels, reused, color="tab:blue")
    ax.axvline(100 * t["oracle_hit_rate"], color="tab:green", linestyle="--", label="oracle (runs seen before)")
    ax.axvline(100 * t["prefix_oracle_rate"], color="grey", linestyle=":", label="prefix oracle")
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of prompt tokens reused")
    ax.set_title(f"{name}: reuse beside the oracle")
    ax.legend(fontsize=8, loc="lower right")

    ax = row[2]
    ax.plot(budgets, [100 * r["first_token_agreement"] for r in compose], "o-", label="first token = off")
    ax.plot(budgets, [100 * r["identical_first_n"] for r in compose], "s-",
            label=f"first {report['max_tokens']} tokens = off")
    ax.set_xlabel("recompute budget (% of reused tokens)")
    ax.set_ylabel("% of requests")
    ax.set_ylim(0, 105)
    ax2 = ax.twinx()
    ax2.plot(budgets, [r["mean_kl"] for r in compose], "^:", color="tab:red", label="mean KL vs off")
    ax2.set_ylabel("mean KL (nats)", color="tab:red")
    ax.set_title(f"{name}: quality against full recompute")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)

    ax = row[3]
    groups = {}
    for r in rows:
        if r["mode"] == "compose" and r.get("tf_kl") is not None:
            groups.setdefault(r.get("selector") or "compose", []).append(r)
    for sel, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["budget"])
        ax.plot([r["tf_kl"] for r in rs], [1e3 * r["ttft_p50_s"] for r in rs], "o-", label=sel)
        for r in rs:
            ax.annotate(f"{100 * r['budget']:.0f}%", (r["tf_kl"], 1e3 * r["ttft_p50_s"]), fontsize=7)
    for r, marker, color in [(off, "s", "black"), (prefix, "D", "grey"),
                             (next((x for x in rows if "floor" in x["label"]), None), "*", "tab:green")]:
        if r and r.get("tf_kl") is not None:
            ax.plot([r["tf_kl"]], [1e3 * r["ttft_p50_s"]], marker, color=color, markersize=9, label=r["label"])
    ax.set_xlabel("teacher-forced KL vs off (nats/token)")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.set_title(f"{name}: quality/speed frontier")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=90)
print(f"plot written to {sys.argv[2]}")
