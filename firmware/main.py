"""Terminal firmware entry point.

On a Pico: ``main.py`` runs at boot with the saved settings (``/settings.json``).
On the unix port::

    micropython firmware/main.py --fd 3 --slave 1 --baud 9600 --state /tmp/slm.json
    micropython firmware/main.py --port /dev/pts/7 ...

``--fd`` is an inherited file descriptor (the master end of a pty), ``--port``
a tty path. ``--slave`` / ``--baud`` / ``--parity`` are factory defaults: a
settings file, once written over Modbus, wins. The state path may also come
from ``VITALS_FW_STATE``. ``--seed`` makes the simulated noise repeatable.
"""

import sys
import time

from micropython import const

_SAMPLE_MS = const(125)
READY = "vitals-fw ready"


def _args(argv):
    opts = {}
    i = 0
    while i < len(argv):
        key = argv[i]
        if key.startswith("--") and i + 1 < len(argv):
            opts[key[2:]] = argv[i + 1]
            i += 2
        else:
            raise SystemExit("usage: main.py [--fd N | --port PATH] [--slave N] [--baud B] "
                             "[--parity N|E|O] [--state FILE] [--seed N]")
    return opts


def run(opts, hal):
    from device import Terminal
    from rtu_slave import RtuSlave
    from settings import Settings
    from slm import SoundLevelMeter

    import os

    state = opts.get("state") or os.getenv("VITALS_FW_STATE") or "/settings.json"
    defaults = {}
    if "slave" in opts:
        defaults["slave"] = int(opts["slave"])
    if "baud" in opts:
        defaults["baud"] = int(opts["baud"])
    if "parity" in opts:
        defaults["parity"] = opts["parity"]
    settings = Settings(state, defaults)
    seed = opts.get("seed")
    meter = SoundLevelMeter(hal.make_adc(int(seed) if seed is not None else None))
    wdt = hal.make_wdt()
    where = int(opts["fd"]) if "fd" in opts else opts.get("port")
    terminal = Terminal(meter, settings)
    a = settings.active
    # opened once: a Pico resets to apply new line settings, a pty has none to apply
    port = hal.make_port(where, a["baud"], a["parity"])
    while True:  # one pass per (re)start of communications
        a = settings.active
        slave = RtuSlave(port, terminal, a["slave"], a["baud"])
        terminal.counters = slave.counters
        print(READY, a["slave"], a["baud"], a["parity"])
        next_sample = time.ticks_ms()
        while not slave.restart_requested:
            wdt.feed()
            now = time.ticks_ms()
            if time.ticks_diff(now, next_sample) >= 0:
                meter.sample()
                next_sample = time.ticks_add(next_sample, _SAMPLE_MS)
                if time.ticks_diff(now, next_sample) > 0:  # we were busy: skip, don't burst
                    next_sample = time.ticks_add(now, _SAMPLE_MS)
            slave.poll(max(1, time.ticks_diff(next_sample, time.ticks_ms())))
        # restart communications (fc 8 sub 1): the saved settings come into force
        if hal.reset():
            return
        settings.reload()
        terminal.apply_measurement_settings()


def main():
    if sys.platform == "rp2":
        import hal_rp2 as hal
    else:
        import hal_unix as hal
    run(_args(sys.argv[1:]), hal)


main()
