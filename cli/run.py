"""`ooc-universal run`: the whole study from one config, resumable."""
from __future__ import annotations

from pathlib import Path

import click

from ooc_universal.cli.options import parse_list, progress_option, run_dir_option
from ooc_universal.config import PRESETS, load_config
from ooc_universal.run import STEP_NAMES
from ooc_universal.run import dry_run as plan_study
from ooc_universal.run import run as run_study

# Options that override config keys (None = keep the config's value).
_OVERRIDES = [
    ("--n-tokens", "n_tokens", int), ("--n-eval-tokens", "n_eval_tokens", int),
    ("--window", "window", int), ("--tokens-source", "source", str),
    ("--source", "reduce_source", str), ("--disk", "disk", str),
    ("--disk-gbps", "disk_gbps", float),
    ("--tokenizer", "tokenizer", str), ("--device", "device", str),
    ("--memory", "memory", str), ("--precision", "precision", str),
    ("--baseline-draws", "baseline_draws", int), ("--seed", "seed", int),
    ("--control-draws", "control_draws", int), ("--ablate-mode", "ablate_mode", str),
    ("--definition", "definition", str), ("--reference", "reference", str),
    ("--scheduler", "scheduler", str), ("--compression", "compression", str),
]


_HELP = {
    "source": "Where the tokens come from (the config's [tokens] source: pile, "
              "zoo-heldout, a text file or folder, a .npy of ids).",
    "reduce_source": "Where the reduce's token blocks come from: store (extract writes "
                     "activation stores, the reduce reads them), stream (forward passes "
                     "feed the reduce; no extract, no stores), auto (chosen once for the "
                     "study before any extract, from the plan's time and the disk budget; "
                     "--dry-run shows both options and why; a study already reduced is not "
                     "costed again).",
    "disk": "Disk budget of the run directory, e.g. 500GB (default: its free space less "
            "a margin). Stores that do not all fit are made one checkpoint at a time.",
    "disk_gbps": "Disk bandwidth in GB/s for the plan (default: measured).",
}


def _override_options(f):
    for flag, key, typ in reversed(_OVERRIDES):
        f = click.option(flag, key, type=typ, default=None,
                         help=_HELP.get(key, f"Override the config's `{key}`."))(f)
    return f


@click.command("run")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Use a built-in config: demo (the default: the shipped tiny zoo, "
                   "offline, minutes on a laptop) or paper (stanford-crfm a..e at "
                   "100k/200k/300k steps, 5M Pile tokens).")
@run_dir_option("where the study's files go (default: runs/<preset or config name>).",
                required=False)
@click.option("--models", default=None, help="Comma-separated model specs (override).")
@click.option("--checkpoints", default=None, help="Comma-separated steps (override).")
@click.option("--thresholds", default=None, help="Comma-separated thresholds (override).")
@_override_options
@click.option("--steps", "only", default=None,
              help=f"Comma-separated subset of steps to run ({','.join(STEP_NAMES)}).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (disk, RAM, FLOPs, time here and on a GPU) and exit; "
                   "works offline.")
@click.option("--force", is_flag=True,
              help="Recompute outputs even when complete, and accept a changed config.")
@click.option("--keep-stores", is_flag=True, default=None,
              help="Keep every checkpoint's stores (refused when they do not fit --disk).")
@click.option("--no-bos", "bos", flag_value=False, default=None,
              help="Windows of text tokens only (models trained without a BOS token).")
@click.option("--allow-mixed-families", is_flag=True, default=None,
              help="Compare models of different families layer by layer (refused otherwise).")
@progress_option()
def run(config, preset, run_dir, models, checkpoints, thresholds, only, dry_run,
        force, progress, keep_stores, bos, allow_mixed_families, **overrides):
    """Run tokens -> extract -> reduce -> universal -> persistence -> ablate -> report.

    CONFIG is a TOML file with RunConfig keys (see README: Configuration); without it
    the demo preset runs offline on the tiny zoo shipped with the package. Every step
    skips complete outputs and resumes partial ones, so after a kill the same command
    continues. The config actually used is saved as RUN/config.toml; every value is
    checked before anything runs (one line naming the field, the value and what is
    expected).

    \b
    Examples:
      ooc-universal run                                   # the demo, offline, minutes
      ooc-universal run --preset paper --dry-run          # the paper's plan, offline
      ooc-universal run study.toml --run-dir runs/study
      ooc-universal run --n-tokens 16384 --steps tokens,extract,reduce
      ooc-universal run study.toml --disk 2TB          # stores one checkpoint at a time
      ooc-universal run study.toml --source stream     # no stores: forward passes feed the reduce
      ooc-universal run --preset paper --source auto --dry-run  # both sources, the choice, why
    """
    if models:
        overrides["models"] = parse_list(models, str, "--models", "a,b,c")
    if checkpoints:
        overrides["checkpoints"] = parse_list(checkpoints, int, "--checkpoints",
                                              "100000,200000")
    if thresholds:
        overrides["thresholds"] = parse_list(thresholds, float, "--thresholds", "0.4,0.5")
    overrides.update(keep_stores=keep_stores or None, bos=bos,
                     allow_mixed_families=allow_mixed_families or None)
    cfg = load_config(config, preset, **{k: v for k, v in overrides.items() if v is not None})
    name = preset or (config and Path(config).stem) or "demo"
    run_dir = run_dir or f"runs/{name}"
    if dry_run:
        plan_study(cfg, run_dir=run_dir, echo=click.echo)
        return
    steps = tuple(parse_list(only, str, "--steps", "reduce,universal")) if only else STEP_NAMES
    bad = [s for s in steps if s not in STEP_NAMES]
    if bad:
        raise click.BadParameter(f"unknown steps {bad}; choose from {STEP_NAMES}",
                                 param_hint="--steps")
    timings = run_study(cfg, run_dir, force=force, progress=progress, steps=steps,
                        echo=click.echo)
    total = sum(v for k, v in timings.items() if isinstance(v, float))
    click.echo(f"done in {total:.1f} s; run directory {run_dir}")
    paths = timings.get("report_paths", {})
    if paths:
        click.echo(f"report: {paths.get('html', paths)}")
