"""Unix-port backend: the serial line is a pseudo terminal, the sensors are simulated.

MicroPython's unix port has no termios, so whoever made the pty put it in raw
mode already. The port is either an inherited file descriptor (the master end
of a pty whose slave end the Modbus master opens; see docs/firmware.md) or a
path of a tty device, opened with ``open(path, 'rb+')``. Never call ``flush()``
on it: the pty answers EINVAL.
"""

import select
import time


class PtyPort:
    """The half-duplex line, as the slave sees it. There is no direction pin."""

    def __init__(self, where, baud):
        self.baud = baud
        self._f = open(where, "rb+")  # an int fd or a path
        self._poll = select.poll()
        self._poll.register(self._f, select.POLLIN)
        self.hung_up = False

    def wait(self, timeout_ms):
        """True when a byte is ready within ``timeout_ms``."""
        for _obj, ev in self._poll.poll(timeout_ms):
            if ev & select.POLLIN:
                return True
            if ev & (select.POLLHUP | select.POLLERR):
                # nobody holds the other end: wait instead of spinning
                self.hung_up = True
                time.sleep_ms(timeout_ms if timeout_ms > 0 else 1)
        return False

    def read_ready(self, into):
        """Append every byte ready now to ``into``; return how many."""
        n = 0
        while self.wait(0):
            b = self._f.read(1)  # read(n) would block until n bytes: one at a time
            if not b:
                break
            into.append(b[0])
            n += 1
        return n

    def write(self, data):
        self._f.write(data)


class DummyWdt:
    """machine.WDT for the unix port: nothing bites."""

    def __init__(self, timeout=8000):
        self.timeout = timeout
        self.fed = 0

    def feed(self):
        self.fed += 1


def make_port(where, baud, parity):
    # ptys refuse parity (tcsetattr PARENB: EINVAL): the line is 8N1 whatever is saved
    return PtyPort(where, baud)


def make_adc(seed=None):
    from slm import SimulatedAdc

    return SimulatedAdc(seed)


def make_wdt():
    return DummyWdt()


def reset():
    """A restart on the unix port keeps the process: the caller re-applies settings."""
    return False
