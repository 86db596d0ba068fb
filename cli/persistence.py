"""`ooc-universal persistence`: do universal neurons stay universal?"""
from __future__ import annotations

import click

from ooc_universal.cli.options import (echo_json, frame_records, json_option,
                                       progress_option, run_dir_option, stdout_to_stderr)


@click.command()
@run_dir_option("holds universal/sets.json; the output goes to RUN/persistence/.")
@progress_option()
@json_option("the persistence rows and the paths written")
def persistence(run_dir, progress, as_json):
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
      ooc-universal persistence -R runs/demo --json > persistence.json
    """
    from ooc_universal.formats.tables import format_persistence
    from ooc_universal.steps.persistence import persistence as run_persistence

    with stdout_to_stderr(as_json):
        out = run_persistence(run_dir, progress=progress)
    if as_json:
        echo_json({"persistence": frame_records(out.result.frame()),
                   "wrote": [out.paths["json"], out.paths["csv"]]})
        return
    click.echo(format_persistence(out.result))
    for key in ("json", "csv"):
        click.echo(f"wrote {out.paths[key]}")
