"""The field side: links to the terminals and the pollers that drive them.

- :mod:`~agent.fieldbus.links`: what every Modbus link shares: the interface the
  pollers talk to (:class:`~agent.fieldbus.links.ModbusLink`, its factory), the errors.
- :mod:`~agent.fieldbus.tcp`: Modbus TCP: the link, and the reactor that collects the
  replies of every TCP link together.
- :mod:`~agent.fieldbus.rtu`: Modbus RTU on a serial port and RTU over TCP: the master
  that ties a reply to its request by timing, the microsecond timer.
- :mod:`~agent.fieldbus.poller`: one task per bus (:class:`~agent.fieldbus.poller.BusPoller`)
  running :mod:`protocols.poll`'s schedule; the decode of replies into readings.
- :mod:`~agent.fieldbus.engine`: :class:`~agent.fieldbus.engine.TcpEngine`, every Modbus
  TCP bus polled from one task with the buses' own pollers.
- :mod:`~agent.fieldbus.sensors`: serial sensors that stream frames of their own.
- :mod:`~agent.fieldbus.portlock`: who holds a serial port.

The package imports nothing itself: import the module you need (the rooms import each
other's modules, and ``vitals run`` loads no more than it uses).
"""

__all__ = ["engine", "links", "poller", "portlock", "rtu", "sensors", "tcp"]
