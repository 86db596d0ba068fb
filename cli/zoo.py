"""`ooc-universal zoo train`: train a tiny byte-level GPT-2 zoo offline."""
from __future__ import annotations

import dataclasses

import click

from ooc_universal.cli.options import (device_option, echo_json, json_option, progress_option,
                                       stdout_to_stderr)

# recipe field -> (click type, help); every ZooRecipe field is overridable.
FIELDS = {
    "n_models": (int, "number of independent models (model i uses seed + i)"),
    "n_layer": (int, "transformer blocks per model"),
    "n_embd": (int, "residual width d_model"),
    "n_head": (int, "attention heads (must divide n_embd)"),
    "d_mlp": (int, "MLP width: neurons per layer"),
    "context": (int, "tokens per window including the BOS at column 0 (= n_positions)"),
    "batch_size": (int, "windows per optimizer step"),
    "steps": (int, "length of the LR schedule; checkpoints are fractions of it"),
    "lr": (float, "peak AdamW learning rate"),
    "warmup_steps": (int, "linear warmup steps"),
    "min_lr_ratio": (float, "cosine decays to lr * this at `steps`"),
    "weight_decay": (float, "AdamW weight decay on 2-D weights"),
    "beta1": (float, "AdamW beta1"),
    "beta2": (float, "AdamW beta2"),
    "grad_clip": (float, "global gradient-norm clip (0 = none)"),
    "seed": (int, "base seed for initialisation and data order"),
    "checkpoint_fracs": (str, "comma-separated fractions of --steps to save, e.g. 0.25,0.5,0.75"),
    "checkpoint_steps": (str, "comma-separated steps to save (overrides the fractions)"),
    "corpus": (str, "'stdlib' (this Python's standard library source) or a local text "
                    "file or directory"),
    "heldout_fraction": (float, "share of files (by path hash) or of a file's tail held out"),
    "eval_bytes": (int, "held-out bytes scored at each checkpoint"),
    "vocab": (str, "vocabulary; only 'bytes' (257 ids, BOS 256)"),
    "save_dtype": (str, "dtype of saved checkpoints: float16 or float32"),
    "name_prefix": (str, "model names are <prefix>-a, <prefix>-b, ..."),
}


def _recipe_options(fn):
    for name in reversed(list(FIELDS)):
        kind, help_ = FIELDS[name]
        fn = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=None,
                          help=f"{help_} [preset value]")(fn)
    return fn


def _tuple(name, text, kind):
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}",
                                 param_hint=f"--{name.replace('_', '-')}") from None


@click.group()
def zoo():
    """Tiny GPT-2 zoos trained offline on bytes (the demo's models).

    \b
    Examples:
      ooc-universal zoo train --preset demo --out my-zoo
      ooc-universal zoo train --help          # every recipe field is an option
    """


@zoo.command()
@click.option("--preset", default="demo", show_default=True, help="recipe to start from")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="directory for the models and zoo.json (resumes what is there)")
@_recipe_options
@device_option("auto")
@click.option("--threads", type=int, default=None, help="torch CPU threads [torch default]")
@click.option("--only", default=None,
              help="comma-separated model indices to train in this process (e.g. 0,2,4)")
@click.option("--keep-train-state", is_flag=True, help="keep train_state.pt after completion")
@progress_option()
@json_option("the models' held-out losses per checkpoint")
def train(preset, out_dir, device, threads, only, keep_train_state, progress, as_json,
          **fields):
    """Train (or resume) a zoo; prints each model's directory and held-out loss.

    \b
    Examples:
      ooc-universal zoo train --preset demo --out my-zoo --threads 1
      ooc-universal zoo train --preset demo --out my-zoo --only 0,1   # split over processes
      ooc-universal zoo train --preset demo --out my-zoo --steps 600 --json
    """
    from ooc_universal.zoo import PRESETS, train_zoo

    if preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}",
                                 param_hint="--preset")
    over = {k: v for k, v in fields.items() if v is not None}
    for name, kind in (("checkpoint_fracs", float), ("checkpoint_steps", int)):
        if name in over:
            over[name] = _tuple(name, over[name], kind)
    if "checkpoint_fracs" in over and "checkpoint_steps" not in over:
        over["checkpoint_steps"] = ()
    recipe = dataclasses.replace(PRESETS[preset], **over)
    indices = None if only is None else _tuple("only", only, int)
    if threads is not None:
        if threads < 1:
            raise click.BadParameter(f"must be >= 1, got {threads}", param_hint="--threads")
        import torch
        torch.set_num_threads(threads)

    with stdout_to_stderr(as_json):
        dirs = train_zoo(recipe, out_dir, device=device, progress=progress,
                         model_indices=indices, keep_train_state=keep_train_state)
    _print_summary(recipe, out_dir, dirs, as_json)


def _print_summary(recipe, out_dir, dirs, as_json=False):
    from pathlib import Path

    from ooc_universal.zoo import heldout_losses

    losses = heldout_losses(out_dir, dirs)
    uni, steps = losses["unigram"], recipe.checkpoints()
    if as_json:
        models = losses["models"]
        echo_json({"steps": list(steps), "unigram_heldout_loss": uni,
                   "models": [{"dir": d, "heldout_loss": {str(s): models.get(Path(d).name, {})
                                                          .get(s) for s in steps}}
                              for d in dirs],
                   "zoo_json": Path(out_dir) / "zoo.json" if losses["complete"] else None,
                   "complete": bool(losses["complete"])})
        return
    click.echo(f"held-out loss (nats/byte) at steps {', '.join(map(str, steps))}"
               + (f"; unigram baseline {uni:.3f}" if uni is not None else ""))
    for d in dirs:
        ck = losses["models"].get(Path(d).name, {})
        click.echo(f"  {d}  " + "  ".join(f"{ck[s]:.3f}" if s in ck else "  -  " for s in steps))
    click.echo(f"zoo: {Path(out_dir) / 'zoo.json'}" if losses["complete"]
               else f"zoo incomplete: train the remaining models into {out_dir}")
