"""MkDocs hook: the CLI reference page is rendered from the typer app when the site is built, so it always says
what `sdit --help` says. The page's marker comment is replaced by every command's usage, arguments and options."""

import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    """Markdown for `sdit` and every sub-command, from the click command typer builds (typer's own renderer)."""
    import typer
    from typer.cli import get_docs_for_click
    from typer.main import get_command

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # `cli` is a top-level module of the repository
        sys.path.insert(0, root)
    from cli import app

    command = get_command(app)
    return get_docs_for_click(obj=command, ctx=typer.Context(command), name="sdit", indent=1)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
