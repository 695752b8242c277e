"""rp2 (Raspberry Pi Pico) backend: UART0 on GP0/GP1 to an RS-485 transceiver
(MAX3485 class) whose DE/RE pins are tied to GP2, the SPL front end on ADC0
(GP26), a hardware watchdog."""

import select
import time

import machine
from micropython import const

_UART_ID = const(0)
_TX_PIN = const(0)
_RX_PIN = const(1)
_DIR_PIN = const(2)
_ADC_PIN = const(26)
_WDT_MS = const(8000)


class Rs485Port:
    """A UART with a direction pin: high while sending, low to listen."""

    def __init__(self, uart, direction, baud):
        self.baud = baud
        self._uart = uart
        self._dir = direction
        self._dir.value(0)
        self._poll = select.poll()
        self._poll.register(uart, select.POLLIN)

    def wait(self, timeout_ms):
        return bool(self._poll.poll(timeout_ms))

    def read_ready(self, into):
        data = self._uart.read()
        if not data:
            return 0
        into.extend(data)
        return len(data)

    def write(self, data):
        self._dir.value(1)
        self._uart.write(data)
        self._uart.flush()  # returns once the last stop bit has left the shifter
        self._dir.value(0)


def make_port(where, baud, parity):
    bits = {"N": None, "E": 0, "O": 1}[parity]
    uart = machine.UART(
        _UART_ID,
        baudrate=baud,
        bits=8,
        parity=bits,
        stop=1 if bits is not None else 2,  # 11 bits a character either way
        tx=machine.Pin(_TX_PIN),
        rx=machine.Pin(_RX_PIN),
        rxbuf=512,
    )
    return Rs485Port(uart, machine.Pin(_DIR_PIN, machine.Pin.OUT), baud)


def make_adc(seed=None):
    return machine.ADC(machine.Pin(_ADC_PIN))


def make_wdt():
    return machine.WDT(timeout=_WDT_MS)


def reset():
    time.sleep_ms(20)  # let the response leave
    machine.reset()
    return True
