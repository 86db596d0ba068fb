"""What every command shares: the run directory, device, progress and --json options,
comma lists, and JSON output.

  --run-dir/-R RUN        the run directory, the same option on every step
  --device DEVICE         auto | cpu | cuda | cuda:N (syntax checked here: exit 2)
  --progress/--no-progress  progress bars on stderr (on by default)
  --json                  machine-readable JSON on stdout and nothing else there: what
                          the step or library would print goes to stderr meanwhile
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

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


def run_dir_option(what: str, required: bool = True):
    """--run-dir/-R RUN; `what` says what the command reads and writes there."""
    return click.option("--run-dir", "-R", "run_dir", required=required, metavar="RUN",
                        type=click.Path(file_okay=False), help=f"Run directory: {what}")


def _check_device(ctx, param, value):
    """The device syntax (auto | cpu | cuda | cuda:N) as a usage error (exit 2); whether
    the device exists is checked where it is used (exit 1)."""
    if value is None:
        return value
    text = str(value).strip()
    kind, sep, index = text.partition(":")
    if text == "auto" or (kind == "cpu" and not sep) or (
            kind == "cuda" and (not sep or index.isdigit())):
        return text
    raise click.BadParameter(f"{text!r} is not a device; expected {DEVICE_HELP}")


def device_option(default: str = "auto"):
    return click.option("--device", default=default, show_default=True, metavar="DEVICE",
                        callback=_check_device, help=f"Where to compute: {DEVICE_HELP}.")


def progress_option():
    """The one progress switch of every command (parameter `progress`)."""
    return click.option("--progress/--no-progress", "progress", default=True,
                        show_default=True,
                        help="Progress bars on stderr; --no-progress for logs and scripts.")


def json_option(what: str = "the table"):
    return click.option("--json", "as_json", is_flag=True,
                        help=f"Print {what} as JSON on stdout (nothing else goes there).")


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True):
    """While the library runs under --json, anything it prints goes to stderr, so that
    stdout holds only the JSON."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def plain(value):
    """`value` as JSON types: NaN and pandas' NA as null, numpy scalars and arrays as
    numbers and lists, paths as text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (bool, str, int)) or value is None:
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if hasattr(value, "tolist"):        # numpy scalars and arrays
        return plain(value.tolist())
    try:
        import pandas as pd
        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    return str(value)


def echo_json(doc) -> None:
    """One JSON document on stdout (strict JSON: no NaN)."""
    click.echo(json.dumps(plain(doc), indent=1, allow_nan=False))


def frame_records(frame) -> list[dict]:
    """A DataFrame's rows as JSON-ready dicts (NA as null)."""
    return [plain(r) for r in frame.astype(object).to_dict("records")]
