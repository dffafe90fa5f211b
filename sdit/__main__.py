"""`python -m sdit`: the `sdit` command."""

from cli import app

app(prog_name="sdit")
