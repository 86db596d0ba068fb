"""The ablation step's output, RUN/ablate/; the only reader and writer.

  ablation.csv        one row per universal / all-non-universal set and per group of
                      control draws (SUMMARY_COLUMNS)
  ablation_draws.csv  one row per evaluated set, every control draw apart (DRAW_COLUMNS)
  ablation.json       step, toolkit_version, config, inputs, models, conventions, columns
                      and rows (the summary rows, NaN as null); written last
  parts/<label>-<key16>.json
                      one finished model: {"key", "draw_rows", "summary_rows"}; the name
                      is hashed from everything the model's rows depend on, so a re-run
                      finds the models it already did

In the CSVs a NaN or missing value is an empty cell. Every file but the parts gets its
checksum sidecar.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ooc_universal.errors import OocError
from ooc_universal.rundir import atomic_path, write_json_atomic

ABLATION_CSV, ABLATION_JSON, DRAWS_CSV = "ablation.csv", "ablation.json", "ablation_draws.csv"
ABLATE_FILES = (DRAWS_CSV, ABLATION_CSV, ABLATION_JSON)
PARTS_DIR = "parts"
SUMMARY_COLUMNS = ["reference", "other", "checkpoint", "threshold", "definition", "mode",
                   "set", "layer", "draw", "n_draws", "n_neurons", "n_positions",
                   "kl", "kl_se", "kl_ci_low", "kl_ci_high",
                   "delta_loss", "delta_loss_se", "delta_loss_ci_low", "delta_loss_ci_high"]
DRAW_COLUMNS = ["reference", "other", "checkpoint", "threshold", "definition", "mode", "set",
                "layer", "draw", "n_neurons", "n_positions", "kl", "kl_se", "delta_loss",
                "delta_loss_se"]


def ablate_paths(run_dir) -> dict[str, Path]:
    out = Path(run_dir) / "ablate"
    return {"csv": out / ABLATION_CSV, "json": out / ABLATION_JSON,
            "draws_csv": out / DRAWS_CSV, "parts": out / PARTS_DIR}


# ---------------------------------------------------------------------------- parts

@dataclass
class AblationPart:
    """One model's finished rows (RUN/ablate/parts/), kept for re-runs."""
    key: str
    draw_rows: list[dict]
    summary_rows: list[dict]

    def to_json(self) -> dict:
        return {"draw_rows": self.draw_rows, "summary_rows": self.summary_rows,
                "key": self.key}


def part_path(run_dir, label: str, key: str) -> Path:
    """Where the part of model `label` with content key `key` is (or will be)."""
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in label)
    return ablate_paths(run_dir)["parts"] / f"{safe}-{key[:16]}.json"


def read_part(path) -> AblationPart | None:
    """The part at `path`, or None when there is none (or it is unreadable: redo it)."""
    try:
        doc = json.loads(Path(path).read_text())
        return AblationPart(doc.get("key", ""), list(doc["draw_rows"]),
                            list(doc["summary_rows"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_part(path, part: AblationPart) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, part.to_json())


# ---------------------------------------------------------------------------- results

@dataclass
class AblationFile:
    """ablation.json; rows are the summary rows (NaN kept here, null on disk)."""
    config: dict
    inputs: dict
    models: dict
    rows: list[dict]
    conventions: str = ""
    toolkit_version: str = ""
    step: str = "ablate"
    columns: list = field(default_factory=lambda: list(SUMMARY_COLUMNS))

    def to_json(self) -> dict:
        return dict(step=self.step, toolkit_version=self.toolkit_version,
                    config=self.config, inputs=self.inputs, models=self.models,
                    conventions=self.conventions, columns=self.columns,
                    rows=[_json_row(r) for r in self.rows])


def _json_row(row) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def read_ablation(run_dir) -> AblationFile:
    """RUN/ablate/ablation.json, or one line naming the step that makes it."""
    path = ablate_paths(run_dir)["json"]
    if not path.is_file():
        raise OocError(f"no ablation results at {str(path)!r}; run `ooc-universal ablate` "
                       "first")
    try:
        doc = json.loads(path.read_text())
        return AblationFile(**{k: doc[k] for k in ("config", "inputs", "models", "rows")},
                            **{k: doc[k] for k in ("conventions", "toolkit_version", "step",
                                                   "columns") if k in doc})
    except (OSError, ValueError, KeyError, TypeError):
        raise OocError(f"{str(path)!r} is not an ablation.json written by `ooc-universal "
                       "ablate`; run that step again") from None


def write_ablation(run_dir, result: AblationFile, draw_rows: list[dict],
                   record: dict | None = None) -> dict[str, Path]:
    """Write the two CSVs, then ablation.json (the completion marker); returns the paths."""
    paths = ablate_paths(run_dir)
    _write_csv(paths["draws_csv"], DRAW_COLUMNS, draw_rows, record)
    _write_csv(paths["csv"], SUMMARY_COLUMNS, result.rows, record)
    write_json_atomic(paths["json"], result.to_json(), record)
    return paths


def _write_csv(path, columns, rows, record: dict | None = None) -> None:
    with atomic_path(path, record) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow([_cell(r.get(c)) for c in columns])


def _cell(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def format_ablation(rows: list[dict]) -> str:
    """Summary rows as an aligned text table (what `ooc-universal ablate` prints)."""
    cols = ["reference", "other", "checkpoint", "threshold", "set", "layer", "n_neurons",
            "kl", "kl_se", "delta_loss", "delta_loss_se"]
    cells = [cols] + [[_text(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def _text(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)
