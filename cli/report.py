"""`ooc-universal report`: the paper's tables and figures from a run directory."""
from __future__ import annotations

import click

from ooc_universal.cli.options import progress_option

from ooc_universal.config import ReportConfig
from ooc_universal.errors import OocError

DEFAULTS = ReportConfig()


@click.command()
@click.argument("run_dir_arg", metavar="[RUN_DIR]", required=False,
                type=click.Path(file_okay=False))
@click.option("--run-dir", default=None, type=click.Path(file_okay=False),
              help="Run directory (same as the RUN_DIR argument; output: RUN/report/).")
@click.option("--zoo-json", default=DEFAULTS.zoo_json, type=click.Path(dir_okay=False),
              help="A zoo's zoo.json, for the models' held-out loss. Default: zoo_json in "
                   "RUN/config.toml, or the zoo.json beside a local model of the run.")
@progress_option()
def report(run_dir_arg, run_dir, zoo_json, no_progress):
    """Write RUN/report/: index.html (one self-contained page) and index.md with PNGs.

    Table 1 (percent universal by threshold and checkpoint, per pair, per layer, with
    the spread over baseline draws), persistence (overall and by layer), ablation (KL
    and loss increase, universal vs matched control, all layers and layer by layer),
    correlation vs rotation baseline, excess distribution, per-layer counts, neuron
    cards (RUN/cards, `ooc-universal cards`) and the models' held-out loss. A step that
    has not run gets a "not run" section.
    report_data.json holds every number the tables show.

    \b
    Examples:
      ooc-universal report --run-dir runs/demo
      ooc-universal report --run-dir runs/demo --zoo-json my-zoo/zoo.json
    """
    from ooc_universal.config import validated
    from ooc_universal.report import report as run_report

    if run_dir_arg and run_dir and run_dir_arg != run_dir:
        raise OocError(f"two run directories given ({run_dir_arg!r} and --run-dir "
                       f"{run_dir!r}); give one")
    target = run_dir_arg or run_dir
    if not target:
        raise click.UsageError("give the run directory: `ooc-universal report RUN_DIR`")
    settings = validated(ReportConfig, {"zoo_json": zoo_json or ""}, "command line")
    paths = run_report(target, settings, progress=not no_progress)
    click.echo(f"wrote {paths['html']}")
    click.echo(f"wrote {paths['md']}")
