"""`ooc-universal clean`: remove leftovers (superseded reduce work, killed writers' temporaries)."""
from __future__ import annotations

import json

import click

from ooc_universal.cli.options import json_option, run_dir_option


@click.command("clean")
@run_dir_option("the one to clean.")
@click.option("--partial", "include_partial", is_flag=True,
              help="Also discard partial reduces that the same reduce command could still "
                   "finish (their checkpoints are lost).")
@click.option("--dry-run", is_flag=True, help="List what would go; remove nothing.")
@json_option("what went (or would go)")
def clean(run_dir, include_partial, dry_run, as_json):
    """Remove what no finished output needs: reduce work directories whose pairs are
    complete or that a reduce with other settings superseded, and the temporaries of
    writers that were killed. A writer that is still running is never touched (its
    lock is taken first). `ooc-universal status` lists the same items as "leftover".

    \b
    Examples:
      ooc-universal clean --run-dir runs/demo --dry-run
      ooc-universal clean --run-dir runs/demo
      ooc-universal clean --run-dir runs/demo --partial   # also unfinished reduces
    """
    from ooc_universal.clean import clean as run_clean
    from ooc_universal.rundir import human_bytes

    gone = run_clean(run_dir, include_partial=include_partial, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps([{"path": str(g.path), "bytes": g.size, "kind": g.kind,
                                "why": g.why} for g in gone], indent=1))
        return
    verb = "would remove" if dry_run else "removed"
    for g in gone:
        click.echo(f"{verb} {g.describe(run_dir)}")
    total = sum(g.size for g in gone)
    click.echo(f"{verb} {len(gone)} item(s), {human_bytes(total)}" if gone
               else "nothing to clean")
