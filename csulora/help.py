"""How the commands present themselves: conventional metavars, ``--help`` in the Runtime panel, and a usage error
(a missing or unknown option, a bad value) as one line and exit 2, like every other bad input.

Why the metavars need this: typer 0.29 renders an option's type as its Python annotation (``--force <bool>``,
``--adapter <list[Path]>``, ``--method <str>``), flags and ``--help`` included, unless the option names a metavar
(typer/core.py, ``display_type``). The options of ``options.py`` name theirs; ``Command`` gives every other option
(``--help``, ``--version``, an option a command still declares itself) the conventional one: none on a flag, else
``INT``, ``FLOAT``, ``TEXT`` or ``PATH``. Older typer releases show click's names (``INTEGER``, ``PATH``) and no
metavar on flags; for them only the flags' and ``--help``'s are set, which changes nothing they show.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import one_line

_NAMES = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def conventional_metavar(param: Any) -> str | None:
    """``""`` for a flag, ``INT``/``FLOAT``/``TEXT``/``PATH`` by type; ``None``: leave it to typer."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    descriptor = getattr(param, "type_descriptor", None)  # typer ≥ 0.29
    if descriptor is None:
        return None
    annotation = descriptor.annotation
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return _NAMES.get(annotation, "VALUE")


def _conventional(params: list) -> None:
    for p in params:
        if isinstance(p, typer.core.TyperOption) and p.metavar is None:
            p.metavar = conventional_metavar(p)
        if getattr(p, "is_flag", False) and p.metavar is None:  # --help, whose metavar typer leaves unset
            p.metavar = ""
        if isinstance(p, typer.core.TyperArgument):  # its name column is its metavar; typer's type column would be
            p.display_type_rich = lambda ctx: None  # the Python annotation (<str>)


class Command(TyperCommand):
    """A csulora command: conventional metavars; ``--help`` shown in the Runtime panel; its description in
    paragraphs that the terminal wraps (a docstring's line breaks would otherwise show mid-sentence)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(self.help).split("\n\n"))

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)
        _conventional(params)
        return params

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
            option.rich_help_panel = "Runtime"
        return option


class Group(TyperGroup):
    """The ``csulora`` group: its own options as above, and usage errors as one line (``error: …``, exit 2)."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)
        _conventional(params)
        return params

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        global _interrupted, _entered
        _interrupted = _entered = False  # one run, one line (in-process runners call main again)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            interrupted(before_command())
            sys.exit(130)
        except Exception as e:  # click's ClickException, whichever copy of click this typer uses
            if not hasattr(e, "format_message") or not hasattr(e, "exit_code"):
                raise
            if type(e).__name__ == "NoArgsIsHelpError":  # `csulora` alone: its help, as typer shows it
                from typer import rich_utils

                rich_utils.rich_format_error(e)
                sys.exit(e.exit_code)
            _say(f"error: {_usage_words(e, argv)}")
            sys.exit(e.exit_code)
        if code == 130 and not _interrupted:  # typer turned a Ctrl-C while parsing into a silent exit 130
            interrupted(before_command())
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # outside a command's own handling (cli._errors), which says what it kept
            interrupted(before_command())
            raise typer.Exit(130) from None


def _usage_words(e: Any, argv: list[str]) -> str:
    """Click's message on one line, with where to look: ``Missing option '--aligned' (csulora sanitize --help)``."""
    words = one_line(e.format_message()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        if ctx.info_name == "eval" and "--json" in argv and "extra argument" in words:
            return f"{words}: eval --json is a flag now (the JSON on stdout); write the file with --json-out PATH"
        words += f" (see {ctx.command_path} --help)"
    return words


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


_interrupted = False
_entered = False  # a command's own handler (cli._errors) has started: from then on it says what it kept


def entered() -> None:
    global _entered
    _entered = True


def before_command(text: str = "interrupted") -> str:
    """What a Ctrl-C outside a command's handler may claim: before it, nothing can have been written."""
    return text if _entered else f"{text}; nothing was written"


def interrupted(text: str) -> None:
    """The one line a Ctrl-C gets, said once, wherever it was caught."""
    global _interrupted
    if not _interrupted:
        _interrupted = True
        _say(text)


def render_help(app: Any, args: list[str], width: int) -> str:
    """``csulora ARGS --help`` as a terminal of ``width`` columns shows it (no colour): for the snapshot in
    docs/cli-help.txt and its test."""
    import os

    from typer.testing import CliRunner

    env = {"COLUMNS": str(width), "TERMINAL_WIDTH": None, "NO_COLOR": "1", "FORCE_COLOR": None, "TERM": "dumb"}
    saved = {k: os.environ.get(k) for k in env}
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="csulora", env=env, color=False)
    for k, v in saved.items():  # CliRunner restores them too; this keeps a caller's environment whatever it does
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if result.exit_code != 0:
        raise RuntimeError(f"csulora {' '.join(args)} --help exited {result.exit_code}: {result.output}")
    return "\n".join(line.rstrip() for line in result.stdout.splitlines()).strip("\n") + "\n"
