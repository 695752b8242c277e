"""Terminal firmware entry point: the bootloader, then the application of the slot it picks.

On a Pico: ``main.py`` runs at boot with the saved settings (``/settings.json``).
On the unix port::

    micropython firmware/main.py --fd 3 --slave 1 --baud 9600 --state /tmp/slm.json
    micropython firmware/main.py --port /dev/pts/7 ...

``--fd`` is an inherited file descriptor (the master end of a pty), ``--port``
a tty path. ``--slave`` / ``--baud`` / ``--parity`` are factory defaults: a
settings file, once written over Modbus, wins. The state path may also come
from ``VITALS_FW_STATE``. ``--seed`` makes the simulated noise repeatable.
``--flash DIR`` is the flash filesystem of the image slots (default: the state
file's directory); ``--trial-s S`` how long a new image has to confirm
(bootloader.py). Exit status 75 means "reset me" (unix port).
"""

import sys

import bootloader

bootloader.start(sys.argv[1:])
