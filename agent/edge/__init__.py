"""What the gateway decides on its own, and what the hub asks of it.

- :mod:`~agent.edge.rules`: edge events from the ``[[rules]]`` of the configuration,
  evaluated on every reading, sent on their own connection.
- :mod:`~agent.edge.commands`: signed commands from the hub: verify, refuse or execute,
  answer signed.

The package imports nothing itself: import the module you need (the rooms import each
other's modules, and ``vitals run`` loads no more than it uses).
"""

__all__ = ["commands", "rules"]
