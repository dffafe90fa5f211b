"""sdit.console on a small app of its own: plain help as written, headings for rare options, one-line errors."""

from typing import Annotated

import typer
from typer.testing import CliRunner

from sdit.console import Formatter, typer_app

runner = CliRunner()
app = typer_app(help="A test app.")


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="What to run [default: nothing].")],
    steps: Annotated[int, typer.Option(min=1, help="Steps, e.g. SDiT-XL/2-sized ones.")] = 3,
    rate: Annotated[float, typer.Option(rich_help_panel="Advanced", help="A rarely used rate.")] = 0.5,
    fast: Annotated[bool, typer.Option("--fast", help="Go fast.")] = False,
):
    """Run something."""


@app.command()
def other() -> None:
    """A second command, so that `run` is a sub-command."""


def test_help_is_plain_text_as_written_with_headings_in_order():
    output = runner.invoke(app, ["run", "--help"], terminal_width=80).output
    assert "What to run [default: nothing]." in output  # square brackets are text, not markup
    assert "NAME" in output and "--steps N" in output and "--rate X" in output
    assert output.index("Arguments:") < output.index("Options:") < output.index("Advanced:")
    assert output.index("--rate") > output.index("Advanced:") > output.index("--steps")
    assert "--fast" in output and "--no-fast" not in output and "[default: False]" not in output


def test_wrapping_keeps_hyphenated_words_whole():
    formatter = Formatter(width=40)
    formatter.write_dl([("--student TEXT", "one of SDiT-S/2, SDiT-B/2, SDiT-L/2, SDiT-XL/2, SDiT-Nano/2")])
    lines = formatter.getvalue().splitlines()
    assert all(len(line) <= 40 for line in lines)
    assert " ".join(" ".join(lines).split()) == ("--student TEXT one of SDiT-S/2, SDiT-B/2, SDiT-L/2, SDiT-XL/2, "
                                                 "SDiT-Nano/2")


def test_usage_errors_take_one_line_and_exit_2():
    for args, fragment in ((["run", "x", "--steps", "0"], "Invalid value for '--steps'"),
                           (["run"], "Missing argument 'NAME'"), (["run", "x", "--nope"], "No such option: --nope")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: {fragment}") and "--help`)" in result.output


def test_a_group_alone_prints_its_help():
    result = runner.invoke(app, [])
    assert "A test app." in result.output and "run" in result.output and "other" in result.output
