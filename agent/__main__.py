"""Entry point of ``vitals`` and ``python -m agent``.

``vitals run`` goes straight to :mod:`agent.runner`, so the long-running agent
never imports typer, rich or the diagnostics; every other command goes
through the typer CLI in :mod:`agent.cli`.
"""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        from agent.runner import main as run_main

        sys.exit(run_main(argv[1:]))
    from agent.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
