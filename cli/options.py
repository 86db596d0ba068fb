"""Parsers shared by the commands: comma lists and the device option."""
from __future__ import annotations

import click

from ooc_universal.devices import DEVICE_HELP
from ooc_universal.errors import UsageError


def parse_list(text, kind=str, name: str = "value", example: str = "a,b"):
    """'0.4, 0.5' -> [0.4, 0.5] (empty items dropped); one line naming the bad item."""
    if text is None:
        return None
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(kind(part))
        except ValueError:
            kind_name = {int: "an integer", float: "a number"}.get(kind, "valid")
            raise UsageError(f"{name} {part!r} is not {kind_name}; give a comma-separated "
                           f"list, e.g. {name} {example}") from None
    return out


def device_option(default: str = "auto"):
    return click.option("--device", default=default, show_default=True,
                        help=f"Where to compute: {DEVICE_HELP}.")


def progress_option():
    """The one progress switch of every command: --no-progress turns the bars off."""
    return click.option("--no-progress", "no_progress", is_flag=True,
                        help="No progress bars (for logs and scripts).")
