"""How numbers and names are written in tables, captions, legends and ids."""
from __future__ import annotations

import math

MISSING = "–"


def _absent(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fixed(x, decimals: int) -> str:
    """`x` with a fixed number of decimals; a dash for a missing value."""
    return MISSING if _absent(x) else f"{x:.{decimals}f}"


def sig4(x) -> str:
    """`x` to 4 significant digits (the ablation tables); a dash for a missing value."""
    return MISSING if _absent(x) else f"{x:.4g}"


def tau_text(threshold) -> str:
    return f"{float(threshold):g}"


def tau_id(threshold) -> str:
    """A threshold in a figure or table id: 0.5 -> "05"."""
    return tau_text(threshold).replace(".", "")


def step_text(checkpoint) -> str:
    """A checkpoint as in tables: the full step, or "no step" for a model without one."""
    return "no step" if checkpoint is None or int(checkpoint) < 0 else str(int(checkpoint))


def step_short(checkpoint) -> str:
    """A checkpoint as on an axis: 1500 -> 1.5k, 3000 -> 3k, 100000 -> 100k."""
    if checkpoint is None or int(checkpoint) < 0:
        return "no step"
    step = int(checkpoint)
    if step >= 1000 and step % 100 == 0:
        return f"{step / 1000:g}k"
    return str(step)


def checkpoint_number(checkpoint) -> int:
    """A checkpoint field as an int (-1 for a model without training steps)."""
    try:
        return int(checkpoint)
    except (TypeError, ValueError):
        return -1


def interval_text(interval) -> str:
    """A checkpoint interval (t1, t2) as a column or legend label."""
    return f"{step_short(interval[0])} -> {step_short(interval[1])}"


def slug(text) -> str:
    """Text safe in an id: letters and digits kept, anything else a dash."""
    return "".join(ch if ch.isalnum() else "-" for ch in str(text)).strip("-")[:40] or "x"


def short_name(name) -> str:
    """A model name short enough for a legend (a path's last parts, a hub id's name)."""
    name = str(name)
    if "/" in name:
        parts = [p for p in name.split("/") if p]
        return parts[-1] if not parts[-1].startswith("checkpoint-") else "/".join(parts[-2:])
    return name


def spread_text(row) -> str:
    """mean ± std [min, max] over the baseline draws of a table1.json row (2 decimals)."""
    if not row or row.get("pct_universal_draws_mean") is None:
        return MISSING
    mean = fixed(row["pct_universal_draws_mean"], 2)
    if row.get("n_draws", 1) < 2 or row.get("pct_universal_draws_std") is None:
        return f"{mean} (1 draw, no spread)"
    return (f"{mean} ± {fixed(row['pct_universal_draws_std'], 2)} "
            f"[{fixed(row['pct_universal_draws_min'], 2)}, "
            f"{fixed(row['pct_universal_draws_max'], 2)}]")


def ci_text(low, high) -> str:
    if low is None or high is None:
        return MISSING
    return f"[{sig4(low)}, {sig4(high)}]"


def main_threshold(thresholds):
    """The paper's threshold 0.5 when present, else the one closest to it."""
    if not thresholds:
        return None
    return min(thresholds, key=lambda t: (abs(float(t) - 0.5), t))


def tokens_short(n) -> str:
    """A token count on an axis: 512, 1.02k, 65.5k, 5M."""
    n = int(n)
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.3g}k"
    return f"{n / 1_000_000:.3g}M"
