"""`ooc-universal report`: the paper's tables and figures from a run directory."""
from __future__ import annotations

import click

from ooc_universal.cli.options import (echo_json, json_option, progress_option,
                                       run_dir_option, stdout_to_stderr)
from ooc_universal.config import ReportConfig
from ooc_universal.errors import UsageError

DEFAULTS = ReportConfig()


@click.command()
@run_dir_option("every step's output is read from there; the report goes to "
                "RUN/report/. (A RUN_DIR argument still works, as in earlier versions.)",
                required=False)
@click.argument("run_dir_arg", metavar="[RUN_DIR]", required=False,
                type=click.Path(file_okay=False))
@click.option("--zoo-json", default=DEFAULTS.zoo_json, type=click.Path(dir_okay=False),
              help="A zoo's zoo.json, for the models' held-out loss. Default: zoo_json in "
                   "RUN/config.toml, or the zoo.json beside a local model of the run.")
@progress_option()
@json_option("the paths written")
def report(run_dir, run_dir_arg, zoo_json, progress, as_json):
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
      ooc-universal report -R runs/demo --json
    """
    from ooc_universal.config import validated
    from ooc_universal.report import report as run_report

    if run_dir_arg and run_dir and run_dir_arg != run_dir:
        raise UsageError(f"two run directories given ({run_dir_arg!r} and --run-dir "
                         f"{run_dir!r}); give one with --run-dir")
    target = run_dir or run_dir_arg
    if not target:
        raise UsageError("no run directory; give it with --run-dir RUN")
    settings = validated(ReportConfig, {"zoo_json": zoo_json or ""}, "command line")
    with stdout_to_stderr(as_json):
        paths = run_report(target, settings, progress=progress)
    if as_json:
        echo_json({"wrote": dict(paths)})
        return
    click.echo(f"wrote {paths['html']}")
    click.echo(f"wrote {paths['md']}")
