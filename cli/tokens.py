"""`ooc-universal tokens`: build the run's token set."""
from __future__ import annotations

import click

from ooc_universal.cli.options import (echo_json, json_option, progress_option,
                                       run_dir_option, stdout_to_stderr)
from ooc_universal.config import TokensConfig, validated
from ooc_universal.rundir import run_lock
from ooc_universal.steps.tokens import tokens as make_tokens

DEFAULTS = TokensConfig()


@click.command("tokens")
@run_dir_option("the token set goes to RUN/tokens/.")
@click.option("--source", required=True,
              help="A text file, a folder of text files (one document per file, sorted by "
                   "path, hidden files skipped), a .npy of token ids (one 1-D stream), or "
                   "'pile' / 'pile:<split>' to stream monology/pile-uncopyrighted (split "
                   "'test' by default; needs the `datasets` package and the network).")
@click.option("--n-tokens", required=True, type=click.IntRange(min=1),
              help="Exactly this many valid positions (rows of every activation store).")
# 0, not the config's default: a token set made on its own has no eval split unless asked
@click.option("--n-eval-tokens", default=0, show_default=True, type=click.IntRange(min=0),
              help="Valid positions of the held-out eval windows that follow (for ablate).")
@click.option("--window", default=DEFAULTS.window, show_default=True, type=click.IntRange(min=2),
              help="Window length including the BOS at column 0; at most the models' context.")
@click.option("--tokenizer", required=True,
              help="'bytes' (id = byte, BOS = 256), 'bytes256' (plain bytes: 256 ids, no BOS), "
                   "a model spec whose own tokenizer to use (a@100000, org/name, a local "
                   "model directory, dir/ckpt_{step}@N), or an HF tokenizer name or path "
                   "(gpt2).")
@click.option("--bos/--no-bos", default=getattr(DEFAULTS, "bos", True), show_default=True,
              help="Column 0 of every window is the tokenizer's BOS (its EOS when it has no "
                   "BOS); --no-bos: windows of text tokens only, for models trained without "
                   "BOS. A tokenizer with neither (bytes256) never gets one.")
@click.option("--model", "models", multiple=True,
              help="A model the token set is for (repeatable): the window is checked against "
                   "its context, read offline (the --tokenizer model's is checked anyway).")
@click.option("--force", is_flag=True,
              help="Replace a different token set already in --run-dir (its stores become stale).")
@progress_option()
@json_option("the token set's summary (hash, counts, tokenizer)")
def tokens(run_dir, source, n_tokens, n_eval_tokens, window, tokenizer, bos, models, force,
           progress, as_json):
    """Build the token set that every model of a run reads.

    Conventions (as the original authors' code): documents are concatenated with the
    EOS token between them; each window is BOS at column 0 followed by the next
    window-1 tokens of that stream (--no-bos: the next window tokens, nothing in front;
    recorded in the token set); BOS/EOS/pad positions and newline tokens ("\\n")
    are not valid; the mask is cut after the n-th valid position, so exactly
    --n-tokens positions are valid. Nothing is shuffled. The set is stored with a
    content hash in RUN/tokens/; an identical set already there is kept as it is.

    \b
    Examples:
      ooc-universal tokens -R runs/demo --source corpus.txt --n-tokens 100000 --tokenizer gpt2
      ooc-universal tokens -R runs/p --source pile --n-tokens 5000000 \\
          --n-eval-tokens 100000 --tokenizer EleutherAI/pythia-160m --no-bos
      ooc-universal tokens -R runs/b --source my-docs/ --n-tokens 16384 --tokenizer bytes --json
    """
    settings = validated(TokensConfig, {"source": source, "n_tokens": n_tokens,
                                        "n_eval_tokens": n_eval_tokens, "window": window,
                                        "tokenizer": tokenizer}, "tokens options")
    with run_lock(run_dir), stdout_to_stderr(as_json):
        result = make_tokens(run_dir, settings, models=models, bos=bos, force=force,
                             progress=progress)
    ts = result.token_set
    if as_json:
        echo_json({"folder": result.folder, "written": bool(result.written), "hash": ts.hash,
                   "n_tokens": ts.n_tokens, "n_windows": ts.n_windows, "window": ts.window,
                   "n_eval_tokens": ts.meta.get("n_eval_tokens"),
                   "tokenizer": ts.tokenizer, "has_bos": bool(ts.has_bos),
                   "bos_token_id": ts.bos_token_id if ts.has_bos else None})
        return
    if not result.written:
        click.echo(f"token set {ts.hash} already in {result.folder}; nothing to do")
        return
    first = f"BOS {ts.bos_token_id}" if ts.has_bos else "no BOS"
    click.echo(f"wrote {result.folder}: {ts.n_tokens} valid tokens in {ts.n_windows} windows "
               f"of {ts.window} (+{ts.meta['n_eval_tokens']} eval), tokenizer {ts.tokenizer}, "
               f"{first}")
    click.echo(f"hash {ts.hash}")
