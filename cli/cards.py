"""`ooc-universal cards`: neuron cards of the top universal neurons of each pair."""
from __future__ import annotations

import click

from ooc_universal.cli.options import (echo_json, json_option, progress_option,
                                       run_dir_option, stdout_to_stderr)
from ooc_universal.config import CardsConfig

DEFAULTS = CardsConfig()


@click.command()
@run_dir_option("holds universal/ and reduce/; the output goes to RUN/cards/.")
@click.option("--top-n", type=int, default=DEFAULTS.top_n, show_default=True,
              help="Cards per model pair: its top neurons by excess correlation (draw 0).")
@click.option("--n-tokens", type=int, default=DEFAULTS.n_tokens, show_default=True,
              help="Tokens a card lists as promoted and as suppressed most.")
@progress_option()
@json_option("the cards (cards.json's) and the path written")
def cards(run_dir, top_n, n_tokens, progress, as_json):
    """Neuron cards: per pair, the top neurons by excess, their matched neurons and the
    tokens their output weights promote and suppress most.

    A card shows, for each other model, the neuron's excess correlation and the
    neuron it correlates with most (from the reduce files), and the neuron's logit
    effect W_out[n] . W_U (final norm's gain folded in) with its skew and plain
    kurtosis over the vocabulary (Gurnee et al.: high kurtosis marks prediction
    neurons, with negative skew suppression neurons). Loads each reference
    checkpoint's weights on the CPU.

    \b
    Examples:
      ooc-universal cards --run-dir runs/demo
      ooc-universal cards --run-dir runs/demo --top-n 16
      ooc-universal cards -R runs/demo --json > cards.json
    """
    from ooc_universal.config import validated
    from ooc_universal.steps.cards import cards as run_cards

    settings = validated(CardsConfig, {"top_n": top_n, "n_tokens": n_tokens}, "command line")
    with stdout_to_stderr(as_json):
        out = run_cards(run_dir, settings, progress=progress)
    if as_json:
        echo_json({"cards": out.cards.cards, "wrote": [out.path]})
        return
    for card in out.cards.cards:
        vocab = card["vocab"]
        chosen = ", ".join(f"{s['other']} #{s['rank']}" for s in card["selected_by"])
        click.echo(f"{card['model']} L{card['layer']}.{card['neuron']}: {chosen}; kurtosis "
                   f"{vocab['kurtosis']:.2f}, skew {vocab['skew']:.2f}"
                   + (f" ({vocab['role']})" if vocab["role"] else ""))
    click.echo(f"wrote {out.path}")
