"""Readings to the hub: batcher -> spool -> uplink, joined by closable channels.

- :mod:`~agent.pipeline.batcher`: readings in, sealed (signed) batches out.
- :mod:`~agent.pipeline.spool`: every sealed batch on disk until the hub's receipt.
- :mod:`~agent.pipeline.uplink`: spooled batches to the broker over MQTT, confirmed by
  the hub; heartbeats and gap notices.
- :mod:`~agent.pipeline.channel`: the closable channels between them.

The package imports nothing itself: import the module you need (the rooms import each
other's modules, and ``vitals run`` loads no more than it uses).
"""

__all__ = ["batcher", "channel", "spool", "uplink"]
