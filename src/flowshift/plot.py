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
from matplotlib.ticker import MaxNLocator

from flowshift.report import NS, TIERS, Tally
from flowshift.stats import Event

# savefig formats of the Agg backend and its vector siblings; the file name's extension picks one
FORMATS = ("png", "svg", "svgz", "pdf", "eps", "ps", "jpg", "jpeg", "webp", "tif", "tiff")
TIER_COLORS = {"machine": "#9e9e9e", "vnic": "#4c72b0", "pnic": "#dd8452"}
EVENT_STYLE = {"offload": ("#2ca02c", "offloads"), "return": ("#9467bd", "returns"),
               "refuse": ("#d62728", "refusals")}
RUG_MAX = 2000  # more events than this are drawn as rates: a rug would be a solid bar
# the default window: the span holding all but ACTIVITY_TAIL of the packets at either end, when
# that span is less than ZOOM_BELOW of the trace (a long, nearly empty tail otherwise squeezes
# the activity into a sliver at the left of the axis)
ACTIVITY_TAIL = 0.01
ZOOM_BELOW = 0.5
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


def activity_window(times: np.ndarray, per_tier: dict[str, np.ndarray], width: float,
                    end: float, marks: list[float]) -> tuple[float, float] | None:
    """Where the packets are: (lo, hi) seconds when they crowd into less than ZOOM_BELOW of
    the trace, else None (the whole trace). PNIC crash and withdrawal times stay inside."""
    total = np.sum(list(per_tier.values()), axis=0) if per_tier else np.zeros(len(times))
    if not len(times) or total.sum() <= 0:
        return None
    cum = np.cumsum(total) / total.sum()
    lo = float(times[int(np.searchsorted(cum, ACTIVITY_TAIL))])
    hi = float(times[min(int(np.searchsorted(cum, 1 - ACTIVITY_TAIL)), len(times) - 1)]) + width
    lo, hi = min([lo, *marks]), max([hi, *marks])
    if hi - lo >= ZOOM_BELOW * end:
        return None
    margin = 0.05 * (hi - lo)
    return max(lo - margin, 0.0), min(hi + margin, end)


def write_plot(path: str | os.PathLike[str], tally: Tally, stats: Any,
               report: dict[str, Any], *,
               window: tuple[float | None, float | None] | None = None) -> None:
    """Write the plot; the format follows the file name's extension (none: PNG).

    `window`: (from, to) seconds of trace time to show, either end None for the trace's own;
    None: where the packets are (activity_window)."""
    first = report["trace"]["first_ts"]
    first_ns = round(first * NS) if first is not None else 0
    width = tally.bin_ns / NS
    times, per_tier = _rates(tally)
    end = max(report["trace"]["duration"], times[-1] + width if len(times) else 0.0, 1e-3)
    marks = [(t - first_ns) / NS for t, kind, _ in stats.events if kind in MARK_STYLE]
    if window is not None:
        x_lo = window[0] if window[0] is not None else 0.0
        x_hi = window[1] if window[1] is not None else max(end, x_lo + 1e-3)
        shown = f"showing {x_lo:g}-{x_hi:g} s"
    else:
        zoom = activity_window(times, per_tier, width, end, marks)
        x_lo, x_hi = zoom if zoom is not None else (0.0, end)
        shown = (f"showing {x_lo:.3g}-{x_hi:.3g} s of {end:.3g} s, where "
                 f"{100 * (1 - 2 * ACTIVITY_TAIL):g}% of the packets are") if zoom else ""

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
        visible = (times + width > x_lo) & (times < x_hi)
        stacked_total = np.sum([per_tier[t] for t in TIERS], axis=0)
        peak = float(stacked_total[visible].max()) if visible.any() else 0.0
        ax_rate.set_ylim(0, max(peak, 1.0) * 1.1)
    else:
        ax_rate.set_ylim(bottom=0)

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
    ax_cache.yaxis.set_major_locator(MaxNLocator(integer=True))  # entries are whole
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
    ax_events.set_xlabel("trace time (s from the first packet)" + (f"; {shown}" if shown else ""))
    if ax_events.get_legend_handles_labels()[0]:
        ax_events.legend(loc="upper right", fontsize=8)
    ax_events.set_xlim(x_lo, x_hi)
    for ax in (ax_rate, ax_cache, ax_events):
        ax.grid(True, alpha=0.3)
    try:
        fig.savefig(path, dpi=110, format=plot_format(path))
    finally:
        plt.close(fig)


def _occupancy_from_events(events: list[Event], first_ns: int,
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
