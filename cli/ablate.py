"""`ooc-universal ablate`: switch off universal and control neurons, measure KL and loss."""
from __future__ import annotations

from typing import get_args

import click

from ooc_universal.cli.options import (device_option, echo_json, json_option, parse_list,
                                       progress_option, run_dir_option, stdout_to_stderr)
from ooc_universal.config import AblateConfig, ComputeConfig
from ooc_universal.errors import UsageError

DEFAULTS = AblateConfig()
MODES = get_args(AblateConfig.model_fields["mode"].annotation)


def _overrides(items) -> dict:
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise UsageError(f"--model {item!r} is not NAME=SPEC; e.g. "
                           "--model alias-gpt2-small-x21@100000=/models/a/checkpoint-100000")
        out[name] = spec
    return out


@click.command()
@run_dir_option("holds universal/sets.json and tokens/; the output goes to RUN/ablate/.")
@click.option("--reference", default=None,
              help="Only this reference model (its name in sets.json, or an alias such "
                   "as 'a'). Default: every reference in sets.json.")
@click.option("--thresholds", default=None,
              help="Comma-separated thresholds to ablate (each must be in sets.json). "
                   "Default: all of them.")
@click.option("--control-draws", type=click.IntRange(min=0), default=DEFAULTS.control_draws,
              show_default=True,
              help="Random control sets per universal set (non-universal neurons, same "
                   "count in every layer); 0 skips controls.")
@click.option("--mode", type=click.Choice(MODES), default=DEFAULTS.mode, show_default=True,
              help="zero: the neuron (the input of the MLP output projection; GPT-2: "
                   "post-GELU) set to 0 (the paper). mean: set to its mean over the "
                   "correlation tokens (from RUN/reduce ref/mean).")
@click.option("--all-non-universal", is_flag=True,
              help="Also ablate every non-universal neuron at once (the paper's wording).")
@click.option("--no-layerwise", is_flag=True,
              help="Skip the per-layer sets (each layer's universal neurons alone).")
@click.option("--n-eval-tokens", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N positions of the token set's held-out split. "
                   "Default: all of it.")
@click.option("--batch-size", type=click.IntRange(min=0), default=DEFAULTS.batch_size,
              show_default=True,
              help="Windows per forward pass; 0: from a memory budget "
                   "(CPU 1 GB, GPU a quarter of free memory).")
@device_option(ComputeConfig().device)
@click.option("--model", "models", multiple=True, metavar="NAME=SPEC",
              help="Model to load for reference NAME (as 'reference@checkpoint', e.g. "
                   "alias-gpt2-small-x21@100000, or an alias like a@100000); default: "
                   "rebuilt from the reduce files' attributes. Repeatable.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help="Seed of the control draws.")
@progress_option()
@json_option("the summary rows (ablation.json's) and the paths written")
def ablate(run_dir, reference, thresholds, control_draws, mode, all_non_universal,
           no_layerwise, n_eval_tokens, batch_size, device, models, seed, progress, as_json):
    """Ablate universal vs control neurons; report KL and delta loss.

    Zero-ablation sets a neuron (an input of the MLP output projection: the post-GELU
    activation in GPT-2 and Pythia, act(gate) * up in OLMo and Llama) to 0, so its row
    of the projection contributes nothing. Each set restarts from the residual
    stream cached just before its first ablated layer. Position t predicts token t+1; the
    evaluated positions T are the valid positions of the held-out windows that have a
    next token in their window. KL = mean over T of KL(P_original || Q_ablated)
    (float64); delta_loss = CE(ablated) - CE(original) on the true next tokens; *_se
    is the standard error over sequences. Control rows give the mean over draws and a
    95% interval over draws (ablation_draws.csv has every draw).

    \b
    Examples:
      ooc-universal ablate --run-dir runs/demo
      ooc-universal ablate --run-dir runs/demo --thresholds 0.5 --control-draws 10
      ooc-universal ablate --run-dir runs/demo --mode mean --device cuda:1
      ooc-universal ablate -R runs/demo --json > ablation.json
    """
    from ooc_universal.config import validated
    from ooc_universal.formats.ablation import format_ablation, tidy_rows
    from ooc_universal.rundir import run_lock
    from ooc_universal.steps.ablate import ablate as run_ablate

    settings = validated(AblateConfig, dict(
        control_draws=control_draws, mode=mode, layerwise=not no_layerwise,
        all_non_universal=all_non_universal, batch_size=batch_size, seed=seed),
        "command line")
    compute = validated(ComputeConfig, {"device": device}, "command line")
    taus = parse_list(thresholds, float, "--thresholds", "0.4,0.5,0.6")
    overrides = _overrides(models)
    with run_lock(run_dir), stdout_to_stderr(as_json):
        out = run_ablate(run_dir, settings, compute, reference=reference, thresholds=taus,
                         n_eval_tokens=n_eval_tokens, model_overrides=overrides,
                         progress=progress)
    if as_json:
        echo_json({"rows": tidy_rows(out.rows), "n_models": out.n_models,
                   "n_resumed": out.n_resumed,
                   "wrote": [out.csv, out.draws_csv, out.json]})
        return
    click.echo(format_ablation(out.rows))
    if out.n_resumed:
        click.echo(f"reused {out.n_resumed} of {out.n_models} model(s) from RUN/ablate/parts")
    for path in (out.csv, out.draws_csv, out.json):
        click.echo(f"wrote {path}")
