"""`ooc-universal bench`: the benchmark suite (ooc_universal.bench.suite)."""
from __future__ import annotations

import click
from click.core import ParameterSource

from ooc_universal.cli.options import (device_option, echo_json, json_option, progress_option,
                                       stdout_to_stderr)


@click.command("bench")
@click.option("--only", default=None, metavar="PARTS",
              help="Comma-separated parts to run: kernels,reduce,extract,ablate [all of "
                   "these]; width (the reduce at the paper's width, ~25 min on 2 cores) "
                   "runs only when named.")
@click.option("--quick", is_flag=True,
              help="Smoke run with small shapes (about 1-2 minutes on 2 CPU cores).")
@click.option("--tiny", is_flag=True,
              help="The smallest run (seconds; the tests use it; figures mean little).")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True,
              help="Multiply the token counts of reduce and extract (e.g. 4 for a larger run).")
@device_option("auto")
@click.option("--memory", default="2GB", show_default=True,
              help="Memory budget given to reduce and extract; peak RSS is reported against it.")
@click.option("--disk-gbps", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True,
              help="Disk bandwidth (GB/s) the projection of the paper's experiment assumes.")
@click.option("--paper-memory", default=None,
              help="Reduce budget the projection plans with [80% of RAM; 90% of GPU memory].")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Torch threads for extract and ablate [torch's default].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Directory for <machine>.json and <machine>.md [bench/results/].")
@click.option("--machine", default=None,
              help="Name of the result files [a slug of device, cores and CPU model].")
@click.option("--update-readme", is_flag=True,
              help="Rewrite the table between the bench markers of README.md "
                   "(<!-- bench:begin/end --> for the whole suite, <!-- bench-width:"
                   "begin/end --> for --only width, likewise for other parts).")
@click.option("--readme", default=None, type=click.Path(dir_okay=False, exists=True),
              help="README to update with --update-readme [the checkout's README.md].")
@click.option("--from-json", "from_json", default=None,
              type=click.Path(dir_okay=False, exists=True),
              help="Measure nothing: re-render the tables (and README) from a results JSON.")
@progress_option()
@click.option("--quiet", "quiet", is_flag=True, hidden=True,
              help="The earlier spelling of --no-progress.")
@json_option("the results document (what <machine>.json holds) and the paths written")
def bench(only, quick, tiny, scale, device, memory, disk_gbps, paper_memory, threads, out_dir,
          machine, update_readme, readme, from_json, progress, quiet, as_json):
    """Benchmark kernels, reduce, extract and ablate against their baselines.

    Every figure is a ratio against a baseline measured in the same run on the same
    data (torch.matmul, a memory copy, the original method, dask.array,
    numpy.corrcoef, a bare forward pass). Writes <machine>.json and <machine>.md,
    prints the Markdown table with the issue's goals beside the figures (never
    asserted) and a projection of the paper's full experiment on this device.

    \b
    Examples:
      ooc-universal bench --quick                      # 1-2 minutes on 2 cores
      ooc-universal bench --only reduce --device cuda:0 --memory 16GB
      ooc-universal bench --from-json bench/results/cpu-2c-xeon.json --update-readme
      ooc-universal bench --tiny --no-progress --json > bench.json
    """
    from ooc_universal.bench import suite
    from ooc_universal.devices import device_name
    from ooc_universal.plan import parse_bytes

    if from_json:
        doc = suite.load_results(from_json)
        out = suite.write_results(doc, out_dir) if out_dir else ()
        _report(doc, list(out), as_json, update_readme, readme)
        return
    if quick and tiny:
        raise click.BadParameter("choose one of --quick and --tiny", param_hint="--quick")
    parse_bytes(memory)  # a bad size fails here, before minutes of work
    if paper_memory:
        parse_bytes(paper_memory)
    cfg = suite.SuiteConfig(
        parts=suite.parse_parts(only), size="tiny" if tiny else "quick" if quick else "default",
        scale=scale, device=device_name(device), memory=memory, disk_gbps=disk_gbps,
        paper_memory=paper_memory, threads=threads, machine=machine,
        argv=_given_options())
    with stdout_to_stderr(as_json):
        doc = suite.run_suite(cfg, progress=progress and not quiet)
    written = list(suite.write_results(doc, out_dir or suite.default_out_dir()))
    _report(doc, written, as_json, update_readme, readme)


def _report(doc, written, as_json, update_readme, readme):
    """The table (or the JSON document) and what was written; the README when asked."""
    from ooc_universal.bench import suite
    updated = suite.update_readme(readme or suite.default_readme(), doc) if update_readme \
        else None
    if as_json:
        echo_json({"results": doc, "wrote": written, "updated_readme": updated})
        return
    click.echo(suite.format_markdown(doc))
    for path in written:
        click.echo(f"wrote {path}")
    if updated:
        click.echo(f"updated {updated}")


def _given_options() -> list:
    """The options given on this command line (for the record in the results)."""
    ctx = click.get_current_context()
    out = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if ctx.get_parameter_source(param.name) == ParameterSource.DEFAULT or value is None:
            continue
        flag = max(param.opts, key=len)
        out += [flag] if value is True else [] if value is False else [flag, str(value)]
    return out
