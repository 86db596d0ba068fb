"""`ooc-universal persistence`: do universal neurons stay universal?"""
from __future__ import annotations

import click

from ooc_universal.cli.options import progress_option


@click.command()
@click.option("--run-dir", required=True, type=click.Path(file_okay=False),
              help="Run directory holding universal/sets.json (output: RUN/persistence/).")
@progress_option()
def persistence(run_dir, no_progress):
    """P(universal at t2 | universal at t1) for every pair of checkpoints t1 < t2.

    p_persist = |U(t1) & U(t2)| / |U(t1)|, a fraction in [0, 1], per (reference, other,
    threshold), for the whole model and per layer; "undefined" (null) when U(t1) is
    empty. Aggregated over a reference's pairs two ways, in rows of their own:
    mean_over_pairs (mean of the defined per-pair values) and pooled_over_pairs
    (summed counts). Also n_emerged = |U(t2) - U(t1)| and the Jaccard overlap.

    \b
    Examples:
      ooc-universal persistence --run-dir runs/demo
      ooc-universal persistence --run-dir runs/demo --no-progress
    """
    from ooc_universal.formats.tables import format_persistence
    from ooc_universal.steps.persistence import persistence as run_persistence

    out = run_persistence(run_dir, progress=not no_progress)
    click.echo(format_persistence(out.result))
    for key in ("json", "csv"):
        click.echo(f"wrote {out.paths[key]}")
