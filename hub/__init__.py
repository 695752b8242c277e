"""The hub: verifies, deduplicates and stores what the gateways send.

- :mod:`hub.core`: :class:`~hub.core.HubCore`, the verifying core (no network)
- :mod:`hub.store`: the :class:`~hub.store.Store` interface and SQLite
  (``hub.pg``: PostgreSQL)
- :mod:`hub.stats`: what ``vitals hub stats`` shows
- :mod:`hub.worker`: :class:`~hub.worker.Hub`, a worker fed from MQTT
- :mod:`hub.enroll`: the enrollment desk (tokens, enrollment, key rotation)
- :mod:`hub.commander`: signed commands to gateways, their verified results
- :mod:`hub.cli`: ``vitals hub``

Layers: protocols <- drivers <- {agent, hub} <- simulator (tests/test_layers.py).
"""
