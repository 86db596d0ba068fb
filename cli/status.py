"""`ooc-universal status`: each step output's state in a run directory; --verify checksums."""
from __future__ import annotations

import json
import sys

import click


@click.command("status")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True,
              help="Re-hash every output that recorded a checksum (each block of an "
                   "activation store, each result file) and the token set; exit 1 on a "
                   "mismatch.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def status(run_dir, verify, as_json):
    """List each step output of RUN_DIR: missing, partial (with progress), complete,
    stale (made from other inputs than those now present: token set, stores, reduce
    files, universal sets, or settings in RUN/config.toml) or corrupt.

    Every output records what produced it (token hash, config hash, toolkit version);
    with --verify the recorded sha256 checksums are recomputed. Reads only.
    """
    from ooc_universal.status import format_status, problems, status as run_status

    rows = run_status(run_dir, verify=verify)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        click.echo(format_status(rows), nl=False)
    bad = problems(rows) if verify else []
    if bad:
        click.echo(f"error: {len(bad)} output(s) failed verification: "
                   f"{', '.join(r['item'] for r in bad)}; delete them and re-run their step",
                   err=True)
        sys.exit(1)
