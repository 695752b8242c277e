"""Modbus RTU slave: frames cut by t3.5 silence, CRC-16, function codes 3, 4,
6, 8, 16, 21 (write file record: firmware images) and 43/14; exception
responses 01-04 and 06; silence on a bad CRC, on a frame for another slave and
on broadcasts.

The transport is handed in (``port`` with ``wait``/``read_ready``/``write``),
the device behind it too (``device`` with ``read_input``, ``read_holding``,
``write_holding``, ``write_file``, ``restart`` and ``ident``), so the same code runs on a
Pico's UART and on a pty under the unix port.
"""

import time

from micropython import const

BROADCAST = const(0)
MAX_FRAME = const(256)

ILLEGAL_FUNCTION = const(1)
ILLEGAL_ADDRESS = const(2)
ILLEGAL_VALUE = const(3)
DEVICE_FAILURE = const(4)


class ModbusError(Exception):
    """Raised by the device to answer with exception ``args[0]``."""


def _make_table():
    t = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        t.append(c)
    return tuple(t)


_TABLE = _make_table()


def crc16(data, n=-1):
    if n < 0:
        n = len(data)
    crc = 0xFFFF
    t = _TABLE
    for i in range(n):
        crc = (crc >> 8) ^ t[(crc ^ data[i]) & 0xFF]
    return crc


def t35_us(baud):
    if baud > 19200:
        return 1750
    return 3500 * 11 * 1000 // baud


def _u16(b, i):
    return (b[i] << 8) | b[i + 1]


class Counters:
    """The diagnostic counters of function 8 (serial line spec, 6.1)."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.bus_messages = 0  # good CRC, any slave
        self.crc_errors = 0
        self.exceptions = 0
        self.server_messages = 0  # addressed to us or broadcast
        self.no_response = 0  # broadcasts processed without an answer


class RtuSlave:
    def __init__(self, port, device, address, baud):
        self.port = port
        self.device = device
        self.address = address
        self.t35_us = t35_us(baud)
        self.counters = Counters()
        self.restart_requested = False
        self.answered = 0  # normal (not exception) responses sent
        self._buf = bytearray()
        self._last_rx = time.ticks_us()

    def poll(self, timeout_ms):
        """Wait up to ``timeout_ms`` for bytes; serve a frame once the line has
        been silent for t3.5 after it. Returns True when a frame was handled."""
        if self._buf:
            # only wait for what is left of the silence
            left = self.t35_us - time.ticks_diff(time.ticks_us(), self._last_rx)
            timeout_ms = min(timeout_ms, max(0, (left + 999) // 1000))
        if self.port.wait(timeout_ms):
            if self.port.read_ready(self._buf):
                self._last_rx = time.ticks_us()
            if len(self._buf) > MAX_FRAME:
                # noise, not a frame: count it, keep only the tail
                self.counters.crc_errors += 1
                self._buf = self._buf[-MAX_FRAME:]
            return False
        if self._buf and time.ticks_diff(time.ticks_us(), self._last_rx) >= self.t35_us:
            frame = bytes(self._buf)
            self._buf = bytearray()
            self.handle_frame(frame)
            return True
        return False

    def handle_frame(self, frame):
        """Serve one whole frame; return the bytes sent (b"" for silence)."""
        c = self.counters
        n = len(frame)
        if n < 4 or crc16(frame, n - 2) != frame[n - 2] | (frame[n - 1] << 8):
            c.crc_errors += 1
            return b""
        c.bus_messages += 1
        slave = frame[0]
        if slave != self.address and slave != BROADCAST:
            return b""
        c.server_messages += 1
        fc = frame[1]
        try:
            pdu = self._dispatch(fc, frame, n - 2, slave == BROADCAST)
        except ModbusError as e:
            pdu = bytes((fc | 0x80, e.args[0]))
            c.exceptions += 1
        except Exception:  # a fault of ours must not kill the bus: answer 04
            pdu = bytes((fc | 0x80, DEVICE_FAILURE))
            c.exceptions += 1
        if slave == BROADCAST:
            c.no_response += 1
            return b""
        if not pdu[0] & 0x80:
            self.answered += 1
        out = bytearray(1 + len(pdu) + 2)
        out[0] = self.address
        out[1 : 1 + len(pdu)] = pdu
        crc = crc16(out, len(out) - 2)
        out[-2] = crc & 0xFF
        out[-1] = crc >> 8
        self.port.write(out)
        return bytes(out)

    def _dispatch(self, fc, f, end, broadcast):
        dev = self.device
        if fc == 3 or fc == 4:
            if end != 6:
                raise ModbusError(ILLEGAL_VALUE)
            addr, count = _u16(f, 2), _u16(f, 4)
            if not 1 <= count <= 125:
                raise ModbusError(ILLEGAL_VALUE)
            if broadcast:
                return b""
            regs = dev.read_holding(addr, count) if fc == 3 else dev.read_input(addr, count)
            out = bytearray(2 + 2 * count)
            out[0] = fc
            out[1] = 2 * count
            for i, v in enumerate(regs):
                out[2 + 2 * i] = (v >> 8) & 0xFF
                out[3 + 2 * i] = v & 0xFF
            return out
        if fc == 6:
            if end != 6:
                raise ModbusError(ILLEGAL_VALUE)
            dev.write_holding(_u16(f, 2), (_u16(f, 4),))
            return f[1:6]
        if fc == 16:
            if end < 7:
                raise ModbusError(ILLEGAL_VALUE)
            addr, count, nbytes = _u16(f, 2), _u16(f, 4), f[6]
            if not 1 <= count <= 123 or nbytes != 2 * count or end != 7 + nbytes:
                raise ModbusError(ILLEGAL_VALUE)
            dev.write_holding(addr, tuple(_u16(f, 7 + 2 * i) for i in range(count)))
            return f[1:6]
        if fc == 21:
            return self._write_file(f, end)
        if fc == 8:
            return self._diagnostics(f, end)
        if fc == 43:
            if end != 5 or f[2] != 14:
                raise ModbusError(ILLEGAL_FUNCTION if end == 5 else ILLEGAL_VALUE)
            return self._device_id(f[3], f[4])
        raise ModbusError(ILLEGAL_FUNCTION)

    def _write_file(self, f, end):
        """Function 21, write file record: sub-requests of reference type 6, answered by an echo."""
        if end < 3 or f[2] != end - 3 or not 7 <= f[2] <= 251:
            raise ModbusError(ILLEGAL_VALUE)
        pos = 3
        records = []
        while pos < end:
            if end - pos < 7 or f[pos] != 6:
                raise ModbusError(ILLEGAL_VALUE)
            file, record, words = _u16(f, pos + 1), _u16(f, pos + 3), _u16(f, pos + 5)
            if record > 9999 or pos + 7 + 2 * words > end or words == 0:
                raise ModbusError(ILLEGAL_ADDRESS if record > 9999 else ILLEGAL_VALUE)
            records.append((file, record, f[pos + 7 : pos + 7 + 2 * words]))
            pos += 7 + 2 * words
        for file, record, data in records:
            self.device.write_file(file, record, data)
        return f[1:end]

    def _diagnostics(self, f, end):
        if end < 4:
            raise ModbusError(ILLEGAL_VALUE)
        sub = _u16(f, 2)
        c = self.counters
        if sub == 0:  # return query data
            return f[1:end]
        if end != 6:
            raise ModbusError(ILLEGAL_VALUE)
        data = _u16(f, 4)
        if sub == 1:  # restart communications option (data FF00: also clear the log)
            if data not in (0, 0xFF00):
                raise ModbusError(ILLEGAL_VALUE)
            self.restart_requested = True
            return f[1:6]
        counters = {
            2: 0,  # diagnostic register: no fault bits
            11: c.bus_messages,
            12: c.crc_errors,
            13: c.exceptions,
            14: c.server_messages,
            15: c.no_response,
        }
        if sub == 10:  # clear counters and diagnostic register
            if data != 0:
                raise ModbusError(ILLEGAL_VALUE)
            c.clear()
            return f[1:6]
        if sub not in counters:
            raise ModbusError(ILLEGAL_FUNCTION)
        if data != 0:
            raise ModbusError(ILLEGAL_VALUE)
        v = counters[sub] & 0xFFFF
        return bytes((8, sub >> 8, sub & 0xFF, v >> 8, v & 0xFF))

    def _device_id(self, code, object_id):
        objects = self.device.ident()  # list of (id, bytes), ids ascending, basic + regular
        if code == 4:
            for oid, value in objects:
                if oid == object_id:
                    return self._id_pdu(code, [(oid, value)], 0)
            raise ModbusError(ILLEGAL_ADDRESS)
        if code not in (1, 2, 3):
            raise ModbusError(ILLEGAL_VALUE)
        last = 2 if code == 1 else 0x7F
        chosen = [o for o in objects if object_id <= o[0] <= last]
        if not chosen:  # "the object id does not match any known object": start over
            chosen = [o for o in objects if o[0] <= last]
        return self._id_pdu(code, chosen, 0)

    def _id_pdu(self, code, objects, next_id):
        out = bytearray((43, 14, code, 0x82, 0, next_id, len(objects)))
        for oid, value in objects:
            out.append(oid)
            out.append(len(value))
            out.extend(value)
        return out
