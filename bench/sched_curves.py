"""``yuebing bench sched``'s curves: every run's point, each series' mean and spread per load, the
capacities read off them, and one plot per experiment. Plain logic but the plot.

A point is one run: an experiment, a series (a placement policy, an architecture with its
admission, an admission mode), an offered load (a multiple of the capacity measured first), a slice
of the trace and a repeat. A curve is a series' points grouped by load: the mean over the slices
and repeats, and the lowest and highest of them (the spread a plot shows as a band).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

# what each point keeps of its run's summary
POINT_METRICS = ("ttft_mean_ms", "ttft_p90_ms", "tbt_p90_ms", "slo_attainment", "slo_attainment_admitted",
                 "goodput_fixed_rps", "offered_rps", "rejected", "rejected_share", "wasted_prefill_tokens",
                 "prefix_hit_ratio", "completed", "failed", "requests")

# the panels of each experiment's plot: (metric, axis label)
PANELS = {
    "placement": (("ttft_mean_ms", "mean TTFT (ms)"), ("ttft_p90_ms", "p90 TTFT (ms)"),
                  ("prefix_hit_ratio", "prefix hit ratio")),
    "architecture": (("slo_attainment", "share meeting both SLOs"), ("goodput_fixed_rps", "goodput (req/s)"),
                     ("ttft_p90_ms", "p90 TTFT (ms)"), ("tbt_p90_ms", "p90 of requests' TBT (ms)")),
    "overload": (("rejected_share", "share rejected"), ("wasted_prefill_tokens", "prefill tokens wasted"),
                 ("goodput_fixed_rps", "goodput (req/s)"), ("slo_attainment_admitted", "admitted meeting SLOs")),
}


def point(experiment: str, series: str, load: float, slice_: int, repeat: int, summary: dict) -> dict:
    return {"experiment": experiment, "series": series, "load": load, "slice": slice_, "repeat": repeat,
            **{k: summary.get(k) for k in POINT_METRICS}}


def curve(points: Iterable[dict], metric: str) -> dict[str, dict[float, dict]]:
    """{series: {load: {mean, min, max, n}}} of ``metric`` over the points that have it."""
    values: dict[str, dict[float, list[float]]] = {}
    for p in points:
        v = p.get(metric)
        if v is not None:
            values.setdefault(p["series"], {}).setdefault(p["load"], []).append(float(v))
    return {s: {load: {"mean": statistics.fmean(vs), "min": min(vs), "max": max(vs), "n": len(vs)}
                for load, vs in sorted(by_load.items())}
            for s, by_load in values.items()}


def threshold_capacity(by_load: dict[float, dict], threshold: float, *, below: bool) -> dict:
    """The capacity of a series against an objective on its mean, ``mean <= threshold`` (``below``)
    or ``mean >= threshold``: the highest measured load that meets it with every lower load meeting
    it too, and the load where the mean crosses the threshold, interpolated linearly between that
    load and the next (both None when the lightest load misses; the highest load when all meet)."""
    meets = (lambda m: m <= threshold) if below else (lambda m: m >= threshold)
    loads = sorted(by_load)
    best = None
    for load in loads:
        if not meets(by_load[load]["mean"]):
            break
        best = load
    crossing = best
    if best is not None and best != loads[-1]:
        nxt = loads[loads.index(best) + 1]
        a, b = by_load[best]["mean"], by_load[nxt]["mean"]
        share = 0.0 if b == a else (threshold - a) / (b - a)
        crossing = round(best + max(0.0, min(1.0, share)) * (nxt - best), 4)
    return {"highest_load_meeting": best, "crossing": crossing}


def ratios(curves: dict[str, dict[float, dict]], num: str, den: str, digits: int = 3) -> dict[float, float]:
    """Per load where both series have a mean: num's mean over den's."""
    a, b = curves.get(num, {}), curves.get(den, {})
    return {load: round(a[load]["mean"] / b[load]["mean"], digits)
            for load in sorted(set(a) & set(b)) if b[load]["mean"]}


def plot(experiment: str, points: Sequence[dict], path: Path, *, capacity_rps: float, title: str = "") -> Path:
    """One PNG: a panel per metric of ``PANELS[experiment]``, load on x (x the measured capacity),
    one line per series (its mean) with a band from the lowest to the highest point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = PANELS[experiment]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    try:
        for ax, (metric, label) in zip(axes[0], panels):
            for series, by_load in sorted(curve(points, metric).items()):
                xs = list(by_load)
                line, = ax.plot(xs, [v["mean"] for v in by_load.values()], marker="o", label=series)
                ax.fill_between(xs, [v["min"] for v in by_load.values()], [v["max"] for v in by_load.values()],
                                color=line.get_color(), alpha=0.18)
            ax.set_xlabel(f"offered load (x capacity {capacity_rps:.2f} req/s)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title or experiment)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return path
