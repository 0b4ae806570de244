"""Plain-text tables for the terminal: `yuebing calibrate` and the benchmarks print their figures so."""

from __future__ import annotations


def format_table(rows: list[dict], cols: list[str], float_format: str = ".6g") -> str:
    """``rows`` under the headers ``cols`` (a missing or None value shows as ``-``), the first column
    left-aligned and the others right-aligned, floats written with ``float_format``."""
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, float_format)
        return str(v)

    body = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(b, widths))))
    return "\n".join(lines)
