"""The field side: links to the terminals and the pollers that drive them.

- :mod:`~agent.fieldbus.links`: Modbus links (RTU on a serial port, Modbus TCP, RTU over
  TCP) on :mod:`protocols.modbus`; one request at a time on a half-duplex line.
- :mod:`~agent.fieldbus.poller`: the pollers (one task per RTU bus, one engine for every
  Modbus TCP terminal) that run :mod:`protocols.poll`'s schedule and turn replies into
  readings.
- :mod:`~agent.fieldbus.sensors`: serial sensors that stream frames of their own.
- :mod:`~agent.fieldbus.portlock`: who holds a serial port.

The package imports nothing itself: import the module you need (the rooms import each
other's modules, and ``vitals run`` loads no more than it uses).
"""

__all__ = ["links", "poller", "portlock", "sensors"]
