"""The terminal application: what a firmware image carries (started by main.py, the bootloader).

``run(opts, boot)`` serves Modbus until the bootloader must take over: a new
image was committed (it returns, the bootloader resets into it) or, on the
unix port, never otherwise. ``opts`` are the command line options (see
main.py); ``boot`` is the bootloader's :class:`bootloader.Boot`: the update
receiver (control registers, function 21) and the trial of a new image.
"""

import sys
import time

from micropython import const

_SAMPLE_MS = const(125)
READY = "vitals-fw ready"


def run(opts, boot):
    if sys.platform == "rp2":
        import hal_rp2 as hal
    else:
        import hal_unix as hal
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
    meter.sample()  # the self-test: a sensor that reads
    wdt = boot.watchdog(hal.make_wdt())  # a trial image must confirm before its deadline
    where = int(opts["fd"]) if "fd" in opts else opts.get("port")
    terminal = Terminal(meter, settings, boot=boot)
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
            if terminal.reboot_requested:
                return  # a new image is in its slot: the bootloader resets into it
            wdt.feed()
            now = time.ticks_ms()
            if time.ticks_diff(now, next_sample) >= 0:
                meter.sample()
                next_sample = time.ticks_add(next_sample, _SAMPLE_MS)
                if time.ticks_diff(now, next_sample) > 0:  # we were busy: skip, don't burst
                    next_sample = time.ticks_add(now, _SAMPLE_MS)
            slave.poll(max(1, time.ticks_diff(next_sample, time.ticks_ms())))
            if boot.trial and slave.answered and not meter.fault:
                boot.confirm()  # self-test passed and a first good exchange: keep this image
        # restart communications (fc 8 sub 1): the saved settings come into force
        if hal.reset():
            return
        settings.reload()
        terminal.apply_measurement_settings()

