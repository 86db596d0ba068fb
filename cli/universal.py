"""`ooc-universal universal`: excess correlation, universal sets and Table 1."""
from __future__ import annotations

from typing import get_args

import click

from ooc_universal.cli.options import (echo_json, frame_records, json_option, parse_list,
                                       progress_option, run_dir_option, stdout_to_stderr)
from ooc_universal.config import UniversalConfig

DEFAULTS = UniversalConfig()
DEFINITIONS = get_args(UniversalConfig.model_fields["definition"].annotation)


@click.command()
@run_dir_option("holds reduce/; the output goes to RUN/universal/.")
@click.option("--reference", default=None,
              help="Reference model (a ref_name of the reduce files, its label, model id "
                   "or alias such as 'a'). Default: the only reference present.")
@click.option("--all-references", is_flag=True,
              help="Repeat the analysis with every reference model of the reduce files.")
@click.option("--thresholds", default=",".join(map(str, DEFAULTS.thresholds)),
              show_default=True,
              help="Comma-separated thresholds tau, each in (0, 1); universal means "
                   "excess > tau (strict).")
@click.option("--definition", type=click.Choice(DEFINITIONS),
              default=DEFAULTS.definition, show_default=True,
              help="per-pair: one set per (reference, other, checkpoint), as in the paper. "
                   "pair-averaged: average max and baseline over the reference's pairs "
                   "before subtracting (Gurnee et al.), one set per checkpoint.")
@click.option("--extra-baseline-draws", type=click.IntRange(min=0),
              default=DEFAULTS.extra_baseline_draws, show_default=True,
              help="More rotation draws computed from each file's cross_comoment (needs "
                   "`reduce --keep-covariance`); they add spread, never change draw 0.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help="First seed for the extra draws (seeds already used by reduce are skipped).")
@progress_option()
@json_option('Table 1 (the draw-0 rows of table1.json) and the paths written')
def universal(run_dir, reference, all_references, thresholds, definition,
              extra_baseline_draws, seed, progress, as_json):
    """Universal neurons and Table 1 from the reduced statistics.

    excess_j[k] = max_l rho(a_k, b_l) - max_m rho(a_k, (R_j b)_m): the best
    correlation of reference neuron k with any neuron of the other model, minus the
    same with the other model rotated layer by layer (draw j). The canonical excess is
    draw 0, the paper's single rotation; further draws only report the spread. A
    neuron is universal when excess > tau (strict: excess == tau is not). Percentages
    count zero-variance neurons (never universal) in the denominator.

    \b
    Examples:
      ooc-universal universal --run-dir runs/demo
      ooc-universal universal --run-dir runs/demo --thresholds 0.3,0.5
      ooc-universal universal --run-dir runs/demo --definition pair-averaged
      ooc-universal universal -R runs/demo --json > table1.json
    """
    from ooc_universal.config import validated
    from ooc_universal.formats.tables import format_table1
    from ooc_universal.steps.universal import check_thresholds, universal as run_universal

    taus = check_thresholds(parse_list(thresholds, float, "threshold",
                                       "0.4,0.5,0.6 (each in (0, 1))"))
    settings = validated(UniversalConfig, {
        "thresholds": list(taus), "definition": definition,
        "extra_baseline_draws": extra_baseline_draws, "seed": seed}, "command line")
    with stdout_to_stderr(as_json):
        out = run_universal(run_dir, settings, reference=reference,
                            all_references=all_references, progress=progress)
    keys = ("sets", "table1", "table1_csv", "table1_draws_csv", "neurons_parquet",
            "neurons_csv", "neuron_draws")
    if as_json:
        echo_json({"table1": frame_records(out.table1.frame(0)),
                   "wrote": [out.paths[k] for k in keys]})
        return
    click.echo(format_table1(out.table1))
    for key in keys:
        click.echo(f"wrote {out.paths[key]}")
