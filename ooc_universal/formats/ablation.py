"""The ablation step's output, RUN/ablate/; the only reader and writer.

  ablation.csv        one row per universal / all-non-universal set and per group of
                      control draws (SUMMARY_COLUMNS): the value of a single set, or the
                      mean over a control's n_draws draws
  ablation_draws.csv  one row per evaluated set, every control draw apart (DRAW_COLUMNS)
  ablation.json       table_version, step, toolkit_version, config, inputs, models,
                      conventions, columns and rows (the summary rows, NaN as null);
                      written last
  parts/<label>-<key16>.json
                      one finished model: {"key", "draw_rows", "summary_rows"}; the name
                      is hashed from everything the model's rows depend on, so a re-run
                      finds the models it already did

Tidy like formats/tables.py (table_version 2): `scope` "all" (every layer at once;
`layer` null) or "layer" (`layer` 0..L-1, an integer); `aggregation` "pair" (`other`
names the other model) or "pair_averaged" (a pair-averaged set: `other` null);
`ablation_mode` zero | mean; no column is named after a DataFrame method. In the CSVs a
NaN or missing value is an empty cell. Every file but the parts gets its checksum
sidecar.

Files of table_version 1 (a text `layer` holding "all", a column `mode`, `draw` "mean"
on control rows) still read: `tidy_row` turns their rows into this layout, and the step
writes version 2 from rows of either layout.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ooc_universal.errors import OocError
from ooc_universal.rundir import atomic_path, write_json_atomic

TABLE_VERSION = 2
ABLATION_CSV, ABLATION_JSON, DRAWS_CSV = "ablation.csv", "ablation.json", "ablation_draws.csv"
ABLATE_FILES = (DRAWS_CSV, ABLATION_CSV, ABLATION_JSON)
PARTS_DIR = "parts"
SCOPE_ALL, SCOPE_LAYER = "all", "layer"         # as formats/tables.py
PAIR, PAIR_AVERAGED = "pair", "pair_averaged"   # aggregation values, as formats/tables.py
_KEYS = ["reference", "aggregation", "other", "checkpoint", "threshold", "definition",
         "ablation_mode", "set", "scope", "layer"]
SUMMARY_COLUMNS = _KEYS + ["n_draws", "n_neurons", "n_positions",
                           "kl", "kl_se", "kl_ci_low", "kl_ci_high",
                           "delta_loss", "delta_loss_se", "delta_loss_ci_low",
                           "delta_loss_ci_high"]
DRAW_COLUMNS = _KEYS + ["draw", "n_neurons", "n_positions", "kl", "kl_se", "delta_loss",
                        "delta_loss_se"]


def tidy_row(row: dict, summary: bool = True) -> dict:
    """A row in the version-2 layout, from a row of either layout (idempotent).

    Version 1 wrote `mode`, a `layer` of "all" or an int, `other` "pair-averaged" on a
    pair-averaged set, and in the summary a `draw` (0, or "mean" on control rows; the
    summary's n_draws says the same)."""
    out = dict(row)
    if "ablation_mode" not in out:
        out["ablation_mode"] = out.pop("mode", "zero")
    if "scope" not in out:
        layer = out.get("layer")
        whole = layer is None or str(layer) == SCOPE_ALL
        out["scope"] = SCOPE_ALL if whole else SCOPE_LAYER
        out["layer"] = None if whole else int(layer)
    if "aggregation" not in out:
        averaged = out.get("definition") == "pair-averaged"
        out["aggregation"] = PAIR_AVERAGED if averaged else PAIR
        if averaged:
            out["other"] = None
    if summary:
        out.pop("draw", None)
    columns = SUMMARY_COLUMNS if summary else DRAW_COLUMNS
    return {**{c: out.get(c) for c in columns},
            **{k: v for k, v in out.items() if k not in columns}}


def tidy_rows(rows, summary: bool = True) -> list[dict]:
    return [tidy_row(r, summary) for r in rows]


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
    """ablation.json; rows are the summary rows in the version-2 layout (tidy_row; NaN
    kept here, null on disk)."""
    config: dict
    inputs: dict
    models: dict
    rows: list[dict]
    conventions: str = ""
    toolkit_version: str = ""
    step: str = "ablate"
    columns: list = field(default_factory=lambda: list(SUMMARY_COLUMNS))

    def __post_init__(self):
        self.rows = tidy_rows(self.rows)
        self.columns = list(SUMMARY_COLUMNS)

    def frame(self):
        """The summary rows as a typed DataFrame (layer Int64, <NA> on scope "all")."""
        from ooc_universal.formats.tables import records_frame
        return records_frame([_json_row(r) for r in self.rows], SUMMARY_COLUMNS)

    def to_json(self) -> dict:
        return dict(table_version=TABLE_VERSION, step=self.step,
                    toolkit_version=self.toolkit_version, config=self.config,
                    inputs=self.inputs, models=self.models, conventions=self.conventions,
                    columns=self.columns, rows=[_json_row(r) for r in self.rows])


def _json_row(row) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def read_ablation(run_dir) -> AblationFile:
    """RUN/ablate/ablation.json (either table_version), or one line naming the step
    that makes it."""
    path = ablate_paths(run_dir)["json"]
    if not path.is_file():
        raise OocError(f"no ablation results at {str(path)!r}; run `ooc-universal ablate` "
                       "first")
    try:
        doc = json.loads(path.read_text())
        version = doc.get("table_version", 1)
        result = AblationFile(**{k: doc[k] for k in ("config", "inputs", "models", "rows")},
                              **{k: doc[k] for k in ("conventions", "toolkit_version", "step")
                                 if k in doc})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise OocError(f"{str(path)!r} is not an ablation.json written by `ooc-universal "
                       "ablate`; run that step again") from None
    if version not in (1, TABLE_VERSION):
        raise OocError(f"{str(path)!r} has table_version {version!r}, this toolkit reads "
                       f"1 and {TABLE_VERSION}; run `ooc-universal ablate` again")
    return result


def read_ablation_draws(run_dir):
    """RUN/ablate/ablation_draws.csv (one row per evaluated set and control draw) as a
    typed DataFrame in the version-2 layout; needs the complete step (ablation.json)."""
    import pandas as pd
    from ooc_universal.formats.tables import records_frame
    read_ablation(run_dir)  # the completion marker, and the one-line error without it
    path = ablate_paths(run_dir)["draws_csv"]
    try:
        raw = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise OocError(f"cannot read {str(path)!r} ({exc}); run `ooc-universal ablate` "
                       "again") from None
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in r.items()} for r in raw.to_dict("records")]
    return records_frame(tidy_rows(records, summary=False), DRAW_COLUMNS)


def write_ablation(run_dir, result: AblationFile, draw_rows: list[dict],
                   record: dict | None = None) -> dict[str, Path]:
    """Write the two CSVs, then ablation.json (the completion marker); returns the paths.
    Rows of either layout are written in the version-2 layout."""
    paths = ablate_paths(run_dir)
    _write_csv(paths["draws_csv"], DRAW_COLUMNS, tidy_rows(draw_rows, summary=False), record)
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
    """Summary rows (either layout) as an aligned text table (what `ooc-universal
    ablate` prints); a whole-model row shows layer "all"."""
    cols = ["reference", "other", "checkpoint", "threshold", "set", "layer", "n_neurons",
            "kl", "kl_se", "delta_loss", "delta_loss_se"]
    shown = [{**r, "layer": SCOPE_ALL if r["scope"] == SCOPE_ALL else r["layer"],
              "other": r["other"] if r["aggregation"] == PAIR else "pair-averaged"}
             for r in tidy_rows(rows)]
    cells = [cols] + [[_text(r.get(c)) for c in cols] for r in shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def _text(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)
