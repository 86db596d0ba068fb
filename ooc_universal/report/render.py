"""Rendering: the document (sections of tables, figures, paragraphs) as Markdown, as one
self-contained HTML page, and as report_data.json; the overview and the footer.

Pure text in, text out: figures arrive as PNG bytes, nothing is read from disk.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from ooc_universal import __version__
from ooc_universal.report.document import Code, Figure, Section, Table, collect

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1150px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.note,figcaption{font-size:.85em;color:#555}figure{margin:1.2em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.8em}
.status{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em .8em}
nav a{margin-right:.8em}
"""


# ---------------------------------------------------------------------------- overview, footer

def overview_section(sections: list[Section]) -> Section:
    """What the report found: one row per step section and its status."""
    overview = Section("overview", "Overview")
    overview.blocks.append(Table(
        "steps", "What this report found in the run directory", ["section", "status"],
        [[s.title, s.status] for s in sections], "", ""))
    return overview


def footer_section(run_dir: Path, provenance, zoo_path, generated: str) -> Section:
    """Where the numbers come from: toolkit versions, token set, input checksums, config."""
    footer = Section("footer", "Provenance")
    versions = provenance.versions
    footer.blocks += [
        f"Generated {generated} by ooc-universal {__version__} from {run_dir}.",
        f"Token set hash: {provenance.token_hash or 'unknown (no tokens/meta.json)'}.",
        "Toolkit versions recorded by the inputs: "
        + (", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "none") + ".",
        f"Reduce files: {provenance.n_reduce_files}. Zoo: {zoo_path or 'none'}."]
    if provenance.input_files:
        footer.blocks.append(Table("sources", "Input files", ["file", "bytes", "sha256 (16 hex)"],
                                   provenance.input_files, "", "exact"))
    if provenance.config_text:
        footer.blocks += ["Run config (RUN/config.toml):",
                          Code(provenance.config_text.rstrip("\n"))]
    else:
        footer.blocks.append("Run config: no RUN/config.toml in this run directory (steps run "
                             "one by one; each output carries its own config).")
    return footer


# ---------------------------------------------------------------------------- Markdown

def _table_note(table: Table) -> str:
    parts = (table.note, f"Rounding: {table.rounding}." if table.rounding else "",
             f"Source: {table.source}." if table.source else "")
    return " ".join(p for p in parts if p)


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    out = [f"**{table.title}**", "",
           "| " + " | ".join(_md_cell(c) for c in table.columns) + " |",
           "|" + "|".join("---" for _ in table.columns) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    note = _table_note(table)
    if note:
        out += ["", f"*{note}*"]
    return out + [""]


def _md_block(block) -> list[str]:
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Figure):
        return [f"![{block.title}]({block.file})", "", f"*Figure: {block.caption}*", ""]
    if isinstance(block, Code):
        return ["```toml", block.text, "```", ""]
    return [str(block), ""]


def render_markdown(sections: list[Section], title: str) -> str:
    """index.md: tables as Markdown, figures linked as the fig_*.png beside it."""
    out = [f"# {title}", "",
           "Contents: " + " · ".join(f"[{s.title}](#{s.id})" for s in sections), ""]
    for section in sections:
        out += [f'<a id="{section.id}"></a>', "", f"## {section.title}", ""]
        for block in section.blocks:
            out += _md_block(block)
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------- HTML

def _html_table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    note = _table_note(table)
    return (f'<table id="t-{e(table.id)}"><caption>{e(table.title)}</caption><thead><tr>'
            f"{head}</tr></thead><tbody>{body}</tbody></table>"
            + (f'<p class="note">{e(note)}</p>' if note else ""))


def _html_figure(figure: Figure) -> str:
    e = html.escape
    data = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure id="f-{e(figure.id)}"><img alt="{e(figure.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>'
            f"{e(figure.title)}.</b> {e(figure.caption)}</figcaption></figure>")


def _html_block(block, section: Section) -> str:
    e = html.escape
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Figure):
        return _html_figure(block)
    if isinstance(block, Code):
        return f"<pre>{e(block.text)}</pre>"
    if section.message and block == section.message:
        return f'<p class="status">{e(str(block))}</p>'
    return f"<p>{e(str(block))}</p>"


def render_html(sections: list[Section], title: str) -> str:
    """One self-contained page: figures as base64 data: URIs, no external assets."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             "<nav>" + "".join(f'<a href="#{s.id}">{e(s.title)}</a>' for s in sections)
             + "</nav>"]
    for section in sections:
        parts.append(f'<section id="{section.id}"><h2>{e(section.title)}</h2>')
        parts += [_html_block(block, section) for block in section.blocks]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- report_data.json

def report_data(run, step_sections: list[Section], all_sections: list[Section],
                generated: str) -> dict:
    """Every number the tables show (full precision) and every series a figure plots."""
    provenance = run.provenance
    tables = collect(step_sections, Table)
    figures = collect(step_sections, Figure)
    return jsonable({
        "generated": generated, "toolkit_version": __version__, "run_dir": str(run.run_dir),
        "token_hash": provenance.token_hash, "input_toolkit_versions": provenance.versions,
        "zoo_json": None if run.zoo_path is None else str(run.zoo_path),
        "config_toml": provenance.config_text,
        "sections": {s.id: {"title": s.title, "status": s.status, "message": s.message}
                     for s in all_sections},
        "tables": {t.id: {"title": t.title, "source": t.source, "rounding": t.rounding,
                          "columns": t.columns, "rows": t.rows, "records": t.records,
                          "note": t.note} for t in tables.values()},
        "figures": {f.id: {"file": f.file, "title": f.title, "caption": f.caption,
                           "source": f.source, "data": f.data} for f in figures.values()},
    })


def jsonable(obj):
    """Plain JSON values: numpy numbers as Python ones, NaN as null, paths as text."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return None if math.isnan(value) else value
    if isinstance(obj, Path):
        return str(obj)
    return obj
