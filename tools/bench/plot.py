#!/usr/bin/env python3
"""Plot the CSV written by `vfmig-bench run --csv FILE` as a PNG.

One panel per link; in each, device-state throughput of the reference loop and of vfmig for every
content profile, with vfmig's ratio to the reference over its bar and the limit (link / CPU) under
each pair. A dashed line marks the tbf rate of rate-limited links.

Usage: python3 tools/bench/plot.py results.csv docs/bench.png
Needs matplotlib (`pip install matplotlib`).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPLS = [("ref", "reference loop (QEMU-style)", "#9e9e9e"), ("vfmig", "vfmig (auto)", "#1f77b4")]


def main(src, dst):
    # One bar per implementation: the FUSE data fd rows (a CSV without the column has only those).
    rows = [r for r in csv.DictReader(open(src)) if r.get("data_fd", "fuse") == "fuse"]
    links = []
    for r in rows:
        if r["link"] not in links:
            links.append(r["link"])
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 4.6), squeeze=False)
    for ax, link in zip(axes[0], links):
        lrows = [r for r in rows if r["link"] == link]
        profiles = []
        for r in lrows:
            if r["profile"] not in profiles:
                profiles.append(r["profile"])
        width = 0.38
        top = 0.0
        for i, (imp, label, color) in enumerate(IMPLS):
            xs, ys = [], []
            for j, p in enumerate(profiles):
                m = [r for r in lrows if r["profile"] == p and r["impl"] == imp]
                if not m:
                    continue
                xs.append(j + (i - 0.5) * width)
                ys.append(float(m[0]["throughput_mbps"]))
            ax.bar(xs, ys, width, label=label, color=color)
            top = max([top] + ys)
            if imp == "vfmig":
                for x, p in zip(xs, profiles):
                    m = [r for r in lrows if r["profile"] == p and r["impl"] == imp][0]
                    ax.annotate(
                        "%.2fx" % float(m["ratio_to_ref"]),
                        (x, float(m["throughput_mbps"])),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        link_bps = float(lrows[0]["link_bits_per_sec"] or 0)
        if link_bps > 0:
            ax.axhline(link_bps / 8e6, ls="--", color="#d62728", lw=1, label="tbf rate")
            top = max(top, link_bps / 8e6)
        ax.set_ylim(0, top * 1.18)
        ax.set_xticks(range(len(profiles)))
        ticks = []
        for p in profiles:
            lim = [r["limit"] for r in lrows if r["profile"] == p]
            ticks.append("%s\n(%s)" % (p, "/".join(lim)))
        ax.set_xticklabels(ticks, fontsize=8)
        ax.set_title(link)
        ax.set_ylabel("device state MB/s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("vfmig vs the reference loop (same run); labels: ratio to reference; (limit ref/vfmig)")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
