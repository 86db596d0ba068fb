"""The report: the paper's tables and figures from the step outputs of one run directory.

    load (data.py: the files -> records)
    -> index (views.py) -> shape (tables.py: tables; series.py: what figures plot)
    -> draw (figures.py) -> assemble (sections.py) -> render (render.py: HTML, Markdown,
    report_data.json, the footer) -> write RUN/report/ (here)

Writes RUN/report/ (built in RUN/report.tmp-<pid>/, then renamed over the old one):
  index.md          tables as Markdown, figures as fig_*.png beside it
  index.html        one self-contained page: the same content, figures as data: URIs
  report_data.json  every number the tables show, as read from the sources (full
                    precision; the table cells are these rounded as each table states),
                    and the series each figure plots

  checksums.json    the sha256 and size of every file above, and the recorded sha256
                    of every input the report was made from (status verifies both)

Every input is optional: a step that has not run gives its section a "not run" line. An
input that is there is verified against its checksum sidecar first (REPORT_INPUTS; the
reduce files by formats.reduced): untrusted or damaged, the report refuses with one line
naming it. A killed report leaves RUN/report.tmp-<pid>*/; the next report removes them.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

from ooc_universal import faults
from ooc_universal.config import ReportConfig
from ooc_universal.errors import OocError
from ooc_universal.rundir import (file_sha256, read_json_document, recorded_sha256,
                                  refuse_if_run_in_progress, remove_dead_temporaries,
                                  run_id, verify_file)
from ooc_universal.report import render, sections, views
from ooc_universal.report.data import find_zoo_json, load_run
from ooc_universal.report.document import Figure, collect
from ooc_universal.report.figures import Palette

__all__ = ["report", "find_zoo_json", "read_manifest", "verified_inputs"]


def report(run_dir, settings: ReportConfig = ReportConfig(), *,
           progress: bool = True) -> dict[str, Path]:
    """Write RUN/report/ (index.md + fig_*.png, index.html, report_data.json).

    `settings.zoo_json` names a zoo's zoo.json for the held-out losses; empty: the
    `zoo_json` of RUN/config.toml, else the one beside a local model of the run.
    A reader never sees half a report: the folder is built beside RUN/report/ and
    renamed over it. Returns {"html", "md", "data", "dir"}.
    """
    run_dir = _checked_run_dir(run_dir)
    refuse_if_run_in_progress(run_dir, "report")
    remove_dead_temporaries(run_dir, "report.tmp-*")  # what a killed report left
    inputs = verified_inputs(run_dir)
    final = run_dir / "report"
    with _building(run_dir) as tmp:
        _write(tmp, *_build(run_dir, settings, progress))
        faults.point("report.write")  # the new report is in report.tmp-<pid>/ here
        write_manifest(tmp, inputs)
        _replace_dir(tmp, final, run_dir / f"report.tmp-{os.getpid()}-old")
    return {"html": final / "index.html", "md": final / "index.md",
            "data": final / "report_data.json", "dir": final}


# the step outputs the report reads (besides the reduce files) and the step that makes each
REPORT_INPUTS = {
    "universal/sets.json": "universal", "universal/table1.json": "universal",
    "universal/neurons.parquet": "universal", "universal/neurons.csv": "universal",
    "universal/table1.csv": "universal", "universal/table1_draws.csv": "universal",
    "persistence/persistence.json": "persistence", "persistence/persistence.csv": "persistence",
    "ablate/ablation.json": "ablate", "ablate/ablation.csv": "ablate",
    "ablate/ablation_draws.csv": "ablate", "cards/cards.json": "cards"}
MANIFEST = "checksums.json"


def verified_inputs(run_dir: Path) -> dict:
    """{input: recorded sha256} of every step output present that the report reads, each
    verified against its checksum sidecar first (one OocError line when one fails)."""
    from ooc_universal.formats.convergence import list_convergence
    from ooc_universal.formats.reduced import list_reduced, verify_reduced
    out = {}
    for rel, step in REPORT_INPUTS.items():
        path = run_dir / rel
        if path.is_file():
            verify_file(path, f"{step} output", f"run `ooc-universal {step} --run-dir "
                        f"{run_dir}` again")
            out[rel] = recorded_sha256(path)
    for path in list_reduced(run_dir):
        verify_reduced(path)  # what the report reads of it
        out[f"reduce/{path.name}"] = recorded_sha256(path)
    for path in list_convergence(run_dir):
        verify_file(path, "convergence table", "run `ooc-universal reduce --force` for "
                    "that pair")
        out[f"reduce/{path.name}"] = recorded_sha256(path)
    return out


def write_manifest(folder: Path, inputs: dict) -> Path:
    """checksums.json: sha256 and size of every file of the built report, and its inputs."""
    from ooc_universal import __version__
    files = {f.name: {"sha256": file_sha256(f), "size": f.stat().st_size}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    path = folder / MANIFEST
    path.write_text(json.dumps({"kind": "manifest", "step": "report", "files": files,
                                "inputs": inputs, "toolkit_version": __version__,
                                "written_at": time.time(), "run_id": run_id(folder.parent)},
                               indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(run_dir) -> dict | None:
    """RUN/report/checksums.json, or None when it is missing or unreadable."""
    try:
        doc = json.loads((Path(run_dir) / "report" / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None


def _checked_run_dir(run_dir) -> Path:
    from ooc_universal.rundir import ensure_writable
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OocError(f"run directory {str(run_dir)!r} does not exist; give the --run-dir "
                       "of a run (it holds universal/, persistence/, ablate/ ...)")
    ensure_writable(run_dir)
    return run_dir


class _building:
    """RUN/report.tmp-<pid>/, fresh on entry, removed when the build fails."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / f"report.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self.path

    def __exit__(self, kind, *_):
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _replace_dir(new: Path, final: Path, old: Path) -> None:
    """Rename `new` over `final`; the old folder is moved aside first, so a failure
    leaves one complete report, never a mix."""
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        faults.point("report.replace")  # no RUN/report/ here: old and new aside
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _build(run_dir: Path, settings: ReportConfig, progress: bool):
    """(all sections, report_data) of the run, figures drawn in memory."""
    from tqdm.auto import tqdm
    generated = time.strftime("%Y-%m-%d %H:%M:%S %z")
    run = load_run(run_dir, settings.zoo_json or None)
    bar = tqdm(desc="report figures", unit="fig", disable=not progress, leave=False)
    ctx = sections.Context(Palette(views.model_names(run)), on_figure=lambda: bar.update(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # matplotlib layout hints
        steps = [sections.table1_section(run.table1, ctx),
                 sections.persistence_section(run.persistence, ctx),
                 sections.ablation_section(run.ablation, ctx),
                 sections.correlations_section(run.neurons, views.report_thresholds(run), ctx),
                 sections.layer_counts_section(run.table1, ctx),
                 sections.convergence_section(run.convergence, ctx),
                 sections.cards_section(run.cards, ctx),
                 sections.zoo_section(run.zoo_path, run.zoo, ctx)]
    bar.close()
    everything = ([render.overview_section(steps)] + steps
                  + [render.footer_section(run_dir, run.provenance, run.zoo_path, generated)])
    return everything, render.report_data(run, steps, everything, generated), run_dir.name


def _write(out: Path, everything: list, data: dict, run_name: str) -> None:
    title = f"Universal neurons: report for {run_name}"
    for figure in collect(everything, Figure).values():
        (out / figure.file).write_bytes(figure.png)
    (out / "index.md").write_text(render.render_markdown(everything, title))
    (out / "index.html").write_text(render.render_html(everything, title))
    with open(out / "report_data.json", "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def read_report_data(run_dir) -> dict:
    """RUN/report/report_data.json (this step's own record of every number it shows),
    or one OocError line."""
    return read_json_document(Path(run_dir) / "report" / "report_data.json", "report")
