"""Running the gateway: its configuration, identity, status and fleet operations.

- :mod:`~agent.ops.config`: the gateway's TOML configuration, checked whole.
- :mod:`~agent.ops.state`: its identity key, boot epoch and the hub's key.
- :mod:`~agent.ops.status`: the status file and ``vitals status``; :mod:`~agent.ops.health`
  ``vitals health``; :mod:`~agent.ops.metrics` the Prometheus endpoint; :mod:`~agent.ops.tap`
  the frames for ``vitals diag trace``.
- :mod:`~agent.ops.systemd`: the notify protocol and the watchdog.
- :mod:`~agent.ops.tls`: the uplink's TLS context.
- :mod:`~agent.ops.provision`: provisioning in the field and key rotation.
- :mod:`~agent.ops.reload`: SIGHUP; :mod:`~agent.ops.confpush`: configuration pushed by the
  hub; :mod:`~agent.ops.fwupdate`: terminal firmware updates.

The package imports nothing itself: import the module you need (the rooms import each
other's modules, and ``vitals run`` loads no more than it uses).
"""

__all__ = [
    "config",
    "confpush",
    "fwupdate",
    "health",
    "metrics",
    "provision",
    "reload",
    "state",
    "status",
    "systemd",
    "tap",
    "tls",
]
