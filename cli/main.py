"""The `deltactl` Typer application: registers every command; holds no logic of its own."""

from __future__ import annotations

from typing import Annotated

import typer

from codec import __version__

from . import cache_commands, codec_commands, demo, registry_commands, serve_model_commands, server_commands
from .errors import state

app = typer.Typer(
    name="deltactl",
    help="Compress, store and serve 1-bit deltas of fine-tuned LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"deltactl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    state.debug = debug


app.command("compress")(codec_commands.compress_cmd)
app.command("apply")(codec_commands.apply_cmd)
app.command("inspect")(codec_commands.inspect_cmd)
server_commands.register(app)
registry_commands.register(app)
cache_commands.register(app)
serve_model_commands.register(app)
app.command("demo")(demo.demo_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
