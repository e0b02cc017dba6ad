"""The replay plot: where packets were processed over trace time, and what the PNIC held.

Three panels on one time axis (seconds from the first packet): packets per second by tier as
stacked areas; second-cache occupancy against its capacity; offloads, returns and refusals (a
rug of single events while they are few, rates when they crowd). A PNIC crash or withdrawal is
a vertical line through every panel.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt
import numpy as np

from flowshift.report import NS, TIERS, Tally

# savefig formats of the Agg backend and its vector siblings; the file name's extension picks one
FORMATS = ("png", "svg", "svgz", "pdf", "eps", "ps", "jpg", "jpeg", "webp", "tif", "tiff")
TIER_COLORS = {"machine": "#9e9e9e", "vnic": "#4c72b0", "pnic": "#dd8452"}
EVENT_STYLE = {"offload": ("#2ca02c", "offloads"), "return": ("#9467bd", "returns"),
               "refuse": ("#d62728", "refusals")}
RUG_MAX = 2000  # more events than this are drawn as rates: a rug would be a solid bar
MARK_STYLE = {"crash": ("#d62728", "PNIC crash"), "withdraw": ("#8c564b", "PNIC withdrawn")}


def _rates(tally: Tally) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bin start times (s) and packets per second of each tier, with empty bins as zero."""
    nbins = max((b for b, _ in tally.rate), default=-1) + 1
    width = tally.bin_ns / NS
    per_tier = {t: np.zeros(nbins) for t in TIERS}
    for (b, tier), n in tally.rate.items():
        if tier in per_tier:
            per_tier[tier][b] += n / width
    return np.arange(nbins) * width, per_tier


def write_plot(path: str | os.PathLike[str], tally: Tally, stats: Any,
               report: dict[str, Any]) -> None:
    """Write the plot; the format follows the file name's extension (none: PNG)."""
    first = report["trace"]["first_ts"]
    first_ns = round(first * NS) if first is not None else 0
    width = tally.bin_ns / NS
    times, per_tier = _rates(tally)
    end = max(report["trace"]["duration"], times[-1] + width if len(times) else 0.0, 1e-3)

    fig, (ax_rate, ax_cache, ax_events) = plt.subplots(
        3, 1, sharex=True, figsize=(11, 7.5), height_ratios=(3, 2, 1.4), layout="constrained")
    p, tiers = report["packets"], report["tiers"]
    name = os.path.basename(report["trace"]["path"])
    fig.suptitle(
        f"{name}: {p['in']:,} packets in {report['trace']['duration']:.1f} s, "
        f"{100 * tiers['pnic']['share']:.0f}% processed on the PNIC, "
        f"{report['offloads']['to_pnic']:,} offloads, {p['dropped']:,} dropped",
        fontsize=11)

    # panel 1: packets per second by tier
    if len(times):
        edges = np.append(times, times[-1] + width)
        stacked = [np.append(per_tier[t], per_tier[t][-1]) for t in TIERS]
        ax_rate.stackplot(edges, stacked, step="post", colors=[TIER_COLORS[t] for t in TIERS],
                          labels=[f"{t} ({100 * tiers[t]['share']:.0f}%)" for t in TIERS],
                          alpha=0.85)
    ax_rate.set_ylabel("packets/s")
    ax_rate.set_title(f"packets per second by tier ({_bin_text(width)} bins)", fontsize=9,
                      loc="left")
    if len(times):
        ax_rate.legend(loc="upper right", fontsize=8)

    # panel 2: second-cache occupancy
    occ = np.array(stats.occupancy, dtype=np.int64).reshape(-1, 2)
    curve_t, curve_n = _occupancy_from_events(stats.events, first_ns, end)
    if len(curve_t) > 1:
        ax_cache.step(curve_t, curve_n, where="post", color="#dd8452",
                      label="entries (offloads - returns)")
    if len(occ):
        ax_cache.plot((occ[:, 0] - first_ns) / NS, occ[:, 1], "o", markersize=3,
                      color="#8c564b", label="PNIC reports")
    capacity = report["config"]["pnic"]["capacity"]
    peak = max(report["flows"]["peak_second_cache"], int(occ[:, 1].max()) if len(occ) else 0,
               int(curve_n.max()))
    top = max(peak, 1) * 1.15
    if capacity <= top * 1.5:  # the capacity line only when it does not flatten the curve
        ax_cache.axhline(capacity, color="#555555", linestyle=":", linewidth=1,
                         label=f"capacity {capacity:,}")
        top = max(top, capacity * 1.08)
    ax_cache.set_ylim(0, top)
    ax_cache.set_ylabel("entries")
    ax_cache.set_title(f"second cache (PNIC) occupancy: peak {peak:,} of {capacity:,}",
                       fontsize=9, loc="left")
    if ax_cache.get_legend_handles_labels()[0]:
        ax_cache.legend(loc="upper right", fontsize=8)

    # panel 3: offload events, as a rug while they are few, as rates when they crowd
    times_by_kind = {kind: [(t - first_ns) / NS for t, k, _ in stats.events if k == kind]
                     for kind in EVENT_STYLE}
    total = sum(len(v) for v in times_by_kind.values())
    if total <= RUG_MAX:
        for row, (kind, (color, label)) in enumerate(EVENT_STYLE.items()):
            ts = times_by_kind[kind]
            ax_events.plot(ts, [row] * len(ts), "|", color=color, markersize=9,
                           label=f"{label} ({len(ts):,})")
        ax_events.set_yticks(range(len(EVENT_STYLE)),
                             [label for _, label in EVENT_STYLE.values()], fontsize=8)
        ax_events.set_ylim(-0.7, len(EVENT_STYLE) - 0.3)
        ax_events.set_title("offload events", fontsize=9, loc="left")
    else:
        ev_width = max(width, end / 200)
        bins = np.arange(max(int(np.ceil(end / ev_width)), 1) + 1) * ev_width
        for kind, (color, label) in EVENT_STYLE.items():
            ts = times_by_kind[kind]
            if ts:
                counts, _ = np.histogram(np.clip(ts, 0, bins[-1]), bins=bins)
                ax_events.step(bins[:-1], counts / ev_width, where="post", color=color,
                               label=f"{label} ({len(ts):,})", linewidth=1)
        ax_events.set_ylabel("events/s")
        ax_events.set_ylim(bottom=0)
        ax_events.set_title(f"offload events per second ({_bin_text(ev_width)} bins)",
                            fontsize=9, loc="left")
    for t, kind, _ in stats.events:
        if kind in MARK_STYLE:
            color, label = MARK_STYLE[kind]
            for ax in (ax_rate, ax_cache, ax_events):
                ax.axvline((t - first_ns) / NS, color=color, linestyle="--", linewidth=1.2)
            ax_rate.annotate(label, ((t - first_ns) / NS, 1), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", color=color,
                             fontsize=8)
    ax_events.set_xlabel("trace time (s from the first packet)")
    if ax_events.get_legend_handles_labels()[0]:
        ax_events.legend(loc="upper right", fontsize=8)
    ax_events.set_xlim(0, end)
    ax_rate.set_ylim(bottom=0)
    for ax in (ax_rate, ax_cache, ax_events):
        ax.grid(True, alpha=0.3)
    try:
        fig.savefig(path, dpi=110, format=plot_format(path))
    finally:
        plt.close(fig)


def _occupancy_from_events(events: list[tuple[int, str, str]], first_ns: int,
                           end: float) -> tuple[np.ndarray, np.ndarray]:
    """Second-cache entries over time, exact at every change: +1 per offload, -1 per return,
    0 after a crash (its entries are lost, not returned)."""
    times, counts = [0.0], [0]
    n = 0
    for t, kind, _ in events:
        if kind == "offload":
            n += 1
        elif kind == "return":
            n = max(n - 1, 0)
        elif kind == "crash":
            n = 0
        else:
            continue
        times.append((t - first_ns) / NS)
        counts.append(n)
    times.append(end)
    counts.append(n)
    return np.array(times), np.array(counts)


def plot_format(path: str | os.PathLike[str]) -> str:
    return os.path.splitext(os.fspath(path))[1][1:].lower() or "png"


def _bin_text(width_s: float) -> str:
    return f"{width_s:g} s" if width_s >= 1 else f"{width_s * 1000:g} ms"
