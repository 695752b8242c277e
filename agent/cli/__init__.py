"""The ``vitals`` command line (typer): :mod:`~agent.cli.main` has every command, ``run``
included (decision 22), :mod:`~agent.cli.diag` the installer's diagnostics and
:mod:`~agent.cli.firmware` ``vitals firmware``, both imported only when asked for.

The package imports nothing itself: import the module you need (the rooms import each
other's modules, and ``vitals run`` loads no more than it uses).
"""

__all__ = ["diag", "firmware", "main"]
