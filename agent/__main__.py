"""Entry point of ``vitals`` and ``python -m agent``: the typer CLI of :mod:`agent.cli.main`."""

from __future__ import annotations


def main() -> None:
    from agent.cli.main import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
