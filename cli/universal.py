"""`ooc-universal universal`: excess correlation, universal sets and Table 1."""
from __future__ import annotations

import json

import click

from ooc_universal.errors import OocError


def _thresholds(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise OocError(f"threshold {part.strip()!r} is not a number; give a comma-"
                           "separated list in (0, 1), e.g. --thresholds 0.4,0.5,0.6") from None
    return values


@click.command()
@click.option("--run-dir", required=True, type=click.Path(file_okay=False),
              help="Run directory holding reduce/ (output goes to RUN/universal/).")
@click.option("--reference", default=None,
              help="Reference model (a ref_name of the reduce files, its label, model id "
                   "or alias such as 'a'). Default: the only reference present.")
@click.option("--all-references", is_flag=True,
              help="Repeat the analysis with every reference model of the reduce files.")
@click.option("--thresholds", default="0.4,0.5,0.6", show_default=True,
              help="Comma-separated thresholds tau, each in (0, 1); universal means "
                   "excess > tau (strict).")
@click.option("--definition", type=click.Choice(["per-pair", "pair-averaged"]),
              default="per-pair", show_default=True,
              help="per-pair: one set per (reference, other, checkpoint), as in the paper. "
                   "pair-averaged: average max and baseline over the reference's pairs "
                   "before subtracting (Gurnee et al.), one set per checkpoint.")
@click.option("--extra-baseline-draws", type=click.IntRange(min=0), default=0,
              show_default=True,
              help="More rotation draws computed from each file's cross_comoment (needs "
                   "`reduce --keep-covariance`); they add spread, never change draw 0.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="First seed for the extra draws (seeds already used by reduce are skipped).")
@click.option("--quiet", "--no-progress", "quiet", is_flag=True,
              help="No progress bars (--no-progress, as in the other steps).")
def universal(run_dir, reference, all_references, thresholds, definition,
              extra_baseline_draws, seed, quiet):
    """Universal neurons and Table 1 from the reduced statistics.

    excess_j[k] = max_l rho(a_k, b_l) - max_m rho(a_k, (R_j b)_m): the best
    correlation of reference neuron k with any neuron of the other model, minus the
    same with the other model rotated layer by layer (draw j). The canonical excess is
    draw 0, the paper's single rotation; further draws only report the spread. A
    neuron is universal when excess > tau (strict: excess == tau is not). Percentages
    count zero-variance neurons (never universal) in the denominator.
    """
    from ooc_universal.steps.universal import format_table1, universal as run_universal

    paths = run_universal(run_dir, reference=reference, thresholds=_thresholds(thresholds),
                          definition=definition, all_references=all_references,
                          extra_baseline_draws=extra_baseline_draws, seed=seed,
                          progress=not quiet)
    with open(paths["table1"]) as f:
        click.echo(format_table1(json.load(f)))
    for key in ("sets", "table1", "table1_csv", "neurons_parquet", "neurons_csv"):
        click.echo(f"wrote {paths[key]}")
