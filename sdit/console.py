"""How `sdit` talks to its user: help as written, and every mistake in one line.

- Help is click's plain text, never parsed as markup (a `[default: ...]` in a help string stays), wrapped at
  spaces only and never cut, whatever the terminal's width; rarely used options go under headings of their own
  (`rich_help_panel="Hardware"` on an option), after the common ones.
- Usage errors (a bad number or choice, a missing or unknown option) print `error: ...` in one line and exit 2,
  as SDiTError does, instead of click's usage box; SDIT_DEBUG=1 raises them instead.
- `command_line()` gives the running command as typed, for the JSON figures a command writes.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
import textwrap
from pathlib import Path

import typer

# typer carries its own click: its exceptions, context, formatter and parameter sources live in typer._click.
from typer._click.core import ParameterSource
from typer._click.exceptions import NoArgsIsHelpError
from typer._click.formatting import HelpFormatter
from typer._click.globals import get_current_context
from typer.core import TyperCommand, TyperGroup
from typer.models import Context as TyperContext

# Rarely used options go under a heading of their own, after the common ones, in this order.
COLUMNS, PERTURB, SYNTH, LOSS, SCHEDULE, MONITOR, SAMPLING = (
    "Source columns", "Perturbations", "Synthetic records", "Loss", "Schedule and checkpoints", "Monitoring",
    "Sampling")
HARDWARE, SCALE, ADVANCED = "Hardware", "Scale out", "Advanced"
PANELS = ("Arguments", "Options", COLUMNS, PERTURB, SYNTH, LOSS, SCHEDULE, MONITOR, SAMPLING, HARDWARE, SCALE,
          ADVANCED)
# What an option's value is, in its help: N for whole numbers, X for real ones, TEXT for the rest (paths, names).
METAVARS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


class Formatter(HelpFormatter):
    """Click's help layout, wrapping at spaces only: preset names (SDiT-XL/2) and hyphenated words stay whole."""

    def write_dl(self, rows, col_max: int = 30, col_spacing: int = 2) -> None:
        rows = list(rows)
        first = min(max(len(term) for term, _ in rows), col_max) + col_spacing
        width = max(self.width - first - self.current_indent, 10)
        for term, text in rows:
            lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False) or [""]
            self.write(" " * self.current_indent + term)
            if len(term) + col_spacing > first:  # a long name: its help starts on the next line
                self.write("\n" + " " * (first + self.current_indent))
            else:
                self.write(" " * (first - len(term)))
            self.write(lines[0] + "\n")
            for line in lines[1:]:
                self.write(" " * (first + self.current_indent) + line + "\n")


class Context(TyperContext):
    formatter_class = Formatter


class Command(TyperCommand):
    """Help in plain text, as written (no markup), never cut at any width; rarely used options under a heading
    of their own (`rich_help_panel=...`)."""

    context_class = Context

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument":
                param.metavar = param.name.upper()
            elif param.is_flag:
                param.show_default = False  # a flag's default is its absence
            elif param.metavar is None:
                param.metavar = METAVARS.get(param.type_descriptor.annotation, "TEXT")

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            if (record := param.get_help_record(ctx)) is None:
                continue
            default = "Options"
            if param.param_type_name == "argument":
                default, record = "Arguments", (param.metavar, record[1])
            sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        for name, records in sorted(sections.items(), key=lambda item: PANELS.index(item[0])):
            if records:
                with formatter.section(name):
                    formatter.write_dl(records)


class Commands(TyperGroup):
    """Usage errors (a bad number or choice, a missing or unknown option) in one line and exit 2, like SDiTError,
    instead of click's usage box."""

    context_class = Context

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as err:  # `sdit` or `sdit bench` alone: its help
            typer.echo(err.format_message())
            code = err.exit_code
        except typer.TyperException as err:
            if os.environ.get("SDIT_DEBUG"):
                raise
            typer.echo(f"error: {_one_line(err, self._path(args, prog_name))}", err=True)
            code = err.exit_code
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code or 0)
        return code


    def _path(self, args, prog_name) -> str:
        """`sdit bench distill`: the command the arguments name, for errors that come without a context."""
        words, group = [prog_name or self.name or "sdit"], self
        for arg in sys.argv[1:] if args is None else args:
            group = getattr(group, "commands", {}).get(arg)
            if group is None:
                break
            words.append(arg)
        return " ".join(words)


def _one_line(err: typer.TyperException, path: str) -> str:
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    return f"{message} (see `{ctx.command_path if ctx is not None else path} --help`)"


def typer_app(**options) -> typer.Typer:
    """A typer app (or sub-app) whose commands show plain help and whose errors take one line."""
    app = typer.Typer(cls=Commands, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                      **options)
    app.command = functools.partial(app.command, cls=Command)
    return app


def command_line() -> str:
    """The running command as a user would type it: the options given on the command line, none of the defaults."""
    ctx = get_current_context()
    words = ctx.command_path.split()
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        values = value if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name == "argument":
            words += map(str, values)
        elif param.is_flag:
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            words += [w for v in values for w in (param.opts[0], str(v))]
    return shlex.join(words)
