"""The `ooc-universal` console script: a click group with one command per step."""
from __future__ import annotations

import importlib
import sys

import click

from ooc_universal import __version__
from ooc_universal.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, OocError, UsageError

# name -> module (under ooc_universal.cli) that defines a click command of that name;
# the order is the data flow.
COMMANDS = [
    ("tokens", "tokens"),
    ("extract", "extract"),
    ("reduce", "reduce"),
    ("universal", "universal"),
    ("cards", "cards"),
    ("persistence", "persistence"),
    ("ablate", "ablate"),
    ("report", "report"),
    ("run", "run"),
    ("zoo", "zoo"),
    ("bench", "bench"),
    ("status", "status"),
    ("clean", "clean"),
]


class OrderedGroup(click.Group):
    def list_commands(self, ctx):
        return list(self.commands)


EPILOG = """\b
Examples:
  ooc-universal run                                  # the demo study, offline, minutes
  ooc-universal universal -R runs/demo --json        # Table 1 as JSON
  ooc-universal status --run-dir runs/demo --verify

\b
Every step takes the run directory as --run-dir/-R RUN, the device as --device
(auto | cpu | cuda | cuda:N), --progress/--no-progress, and, where it prints a table,
--json (JSON on stdout and nothing else there).

\b
Exit status:
  0    done
  1    a run-time failure: missing or damaged input, stale output, no room, a task
       that kept failing (one line on stderr)
  2    a usage error: the command line or the config is wrong (one line on stderr)
  130  interrupted (Ctrl-C); run the same command again to resume
"""


@click.group(cls=OrderedGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EPILOG)
@click.version_option(__version__, prog_name="ooc-universal")
def cli():
    """Find universal neurons in independently trained language models, out of core.

    Steps, in data-flow order: tokens -> extract -> reduce -> universal -> cards ->
    persistence -> ablate -> report. Each reads and writes files in one run
    directory, can be re-run, and resumes where it stopped.
    """


def _register():
    for name, module in COMMANDS:
        full = f"ooc_universal.cli.{module}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:  # step not built yet in this checkout
                continue
            raise
        cli.add_command(getattr(mod, name.replace("-", "_")), name)


_register()


def _one_line(text) -> str:
    return "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def main(argv=None):
    """Entry point: every error is one line on stderr. Exit status 2: a usage error (the
    command line or config is wrong); 1: a run-time failure (missing or damaged input,
    stale output, no room, a task that kept failing); 130: interrupted (resumable)."""
    try:
        rv = cli.main(args=argv, prog_name="ooc-universal", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except UsageError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(EXIT_USAGE)
    except OocError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(EXIT_FAILURE)
    except click.exceptions.Abort:
        click.echo("error: interrupted; run the same command again to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error
        where = exc.ctx.command_path if exc.ctx is not None else "ooc-universal"
        click.echo(f"error: {_one_line(exc.format_message()).rstrip('.')}; see `{where} --help`",
                   err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; run the same command again to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        from ooc_universal.rundir import is_disk_full
        if not is_disk_full(exc):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(f"error: disk full{where}: {exc.strerror}; free some space and run the "
                   "same command again (finished work is kept)", err=True)
        sys.exit(EXIT_FAILURE)


if __name__ == "__main__":
    main()
