"""Modbus, both ways, without IO: one codec for every master and slave of vitals.

* :mod:`~protocols.modbus.values`: the data model (:class:`Space`,
  :class:`DataType`, :class:`Order`, :class:`PointSpec`) and the value codecs
  (:func:`decode`, :func:`encode`: registers to values and back);
* :mod:`~protocols.modbus.plan`: the reads of a device's points
  (:func:`plan`, :class:`ReadRequest`, :func:`decode_response`) and the write
  of one point (:func:`write_request`);
* :mod:`~protocols.modbus.pdu`: every function code's request and response
  PDU, encoded and decoded on both sides, exception responses, a PDU's length
  from its first bytes;
* :mod:`~protocols.modbus.rtu`: the RTU frame around a PDU (slave address,
  CRC-16), t3.5 / t1.5, a frame's length from its first bytes, the master's
  incremental response parser;
* :mod:`~protocols.modbus.mbap`: the Modbus TCP frame (MBAP header) and the
  transaction table of a connection as a state machine.

The firmware (``firmware/``, MicroPython) keeps its own small slave; nothing
else in the repository frames Modbus bytes (``tests/test_layers.py``).
Only the data model and planning are exported here; import the framing
modules by name (``from protocols.modbus import rtu``).
"""

from protocols.modbus.plan import ReadRequest, decode_response, plan, write_request
from protocols.modbus.values import (
    DataType,
    Order,
    PointSpec,
    PointValue,
    Space,
    decimals,
    decode,
    encode,
    register_count,
)

__all__ = [
    "DataType",
    "Order",
    "PointSpec",
    "PointValue",
    "ReadRequest",
    "Space",
    "decimals",
    "decode",
    "decode_response",
    "encode",
    "plan",
    "register_count",
    "write_request",
]
