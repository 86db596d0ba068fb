"""`ooc-universal status`: each step output's state in a run directory; --verify checksums."""
from __future__ import annotations

import json
import sys

import click

from ooc_universal.cli.options import json_option


@click.command("status")
@click.option("--run-dir", "-R", "run_dir_opt", metavar="RUN", type=click.Path(file_okay=False),
              default=None, help="Run directory: the one to describe (as on every other "
                                 "step; the positional RUN_DIR still works).")
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@click.option("--verify", is_flag=True,
              help="Re-hash every output that recorded a checksum (each block of an "
                   "activation store, each result file) and the token set; exit 1 on a "
                   "mismatch.")
@json_option("the rows")
def status(run_dir_opt, run_dir, verify, as_json):
    """List each step output of RUN_DIR: missing, partial (with progress), complete,
    stale (made from other inputs than those now present: token set, stores, reduce
    files, universal sets, or settings in RUN/config.toml) or corrupt.

    Every output records what produced it (token hash, config hash, toolkit version);
    with --verify the recorded sha256 checksums are recomputed. Reads only.
    Leftovers (superseded reduce work, killed writers' temporaries) are listed with
    their size; `ooc-universal clean` removes them.

    \b
    Examples:
      ooc-universal status --run-dir runs/demo
      ooc-universal status --run-dir runs/demo --verify     # exit 1 on a mismatch
      ooc-universal status --run-dir runs/demo --json > status.json
    """
    if run_dir_opt and run_dir and run_dir_opt != run_dir:
        raise click.UsageError(f"two run directories given ({run_dir_opt!r} and {run_dir!r}); "
                               "give one with --run-dir")
    run_dir = run_dir_opt or run_dir
    if not run_dir:
        raise click.UsageError("no run directory; give it with --run-dir RUN")
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
