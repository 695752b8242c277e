"""The bootloader: which image slot runs, the receiving of a new image, its trial.

Never part of an image: it is what an image cannot break. Two slots, ``a``
and ``b``; the factory firmware is slot ``a`` until an update overwrites it.
A new image is received into ``rx.img`` in flash (function 21 chunks, in
order; a power cut keeps what was written, so the transfer resumes where
the file ends), checked against its SHA-256 when the gateway commits it,
unpacked into the inactive slot, and booted *on trial*: the next boot runs
it once. It keeps the slot when its self-test passed and it answered a first
good Modbus request (``confirm``); if it raises at boot, or does not confirm
within ``trial_s``, or the terminal restarts before it confirmed (a crash, a
hang the watchdog reset, a power cut), the previous slot comes back and the
control registers say why (``ROLLED_BACK``, ``E_BOOT_CRASH`` / ``E_UNCONFIRMED``).

The state is ``fwboot.json`` in flash, written whole (a temporary file, then a
rename). Flash layout (unix port: under ``--flash DIR``; rp2: the root of the
littlefs filesystem)::

    fwboot.json   active/previous slot, trial, transfer in progress, last outcome
    rx.img        the image being received
    slot_a/       slot a (absent: the factory firmware, beside this module)
    slot_b/       slot b

"Reset" is ``machine.reset()`` on a Pico; on the unix port the process exits
with status 75 and whoever runs it (simulator.firmware) starts it again, as
the power-on would.
"""

import hashlib
import json
import os
import sys
import time

from micropython import const

# holding register 48: the update's state
IDLE = const(0)
RECEIVING = const(1)
REBOOTING = const(2)  # committed: the next boot runs it on trial
TRIAL = const(3)
CONFIRMED = const(4)
REJECTED = const(5)  # the image failed a check: nothing was booted (see the error)
ROLLED_BACK = const(6)  # the new image failed its trial: the previous one runs again

# holding register 49: why
E_NONE = const(0)
E_HASH = const(1)  # the received bytes do not have the announced SHA-256
E_ARCHIVE = const(2)  # the image is not a well-formed slot archive
E_FLASH = const(3)  # flash refused a write
E_BOOT_CRASH = const(4)  # the new image raised at boot
E_UNCONFIRMED = const(5)  # the new image did not confirm within its trial

CMD_BEGIN = const(1)
CMD_COMMIT = const(2)
CMD_ABORT = const(3)

CHUNK_MAX = const(240)  # bytes of one function 21 record (a 252-byte frame)
MAX_IMAGE = const(262144)
RESET_EXIT = const(75)
TRIAL_S = const(60)

# Modbus exception codes the receiver answers with
ILLEGAL_ADDRESS = const(2)
ILLEGAL_VALUE = const(3)
DEVICE_FAILURE = const(4)
BUSY = const(6)


class Refused(Exception):
    """An update request the terminal answers with exception ``args[0]``."""


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return 0


def _rmtree(path):
    if not _exists(path):
        return
    for name in os.listdir(path):
        os.remove(path + "/" + name)
    os.rmdir(path)


def reset():
    """Start again from the bootloader (never returns)."""
    if sys.platform == "rp2":
        import machine

        time.sleep_ms(50)  # let the last response leave
        machine.reset()
    raise SystemExit(RESET_EXIT)


class Boot:
    def __init__(self, flash, trial_s=TRIAL_S):
        self.flash = flash
        self.trial_s = trial_s
        self.trial = False  # this boot runs an image on trial
        self.deadline = time.ticks_ms()  # set at a trial boot
        self.reboot = False  # an image was committed: reset into it
        self._path = flash + "/fwboot.json"
        self._rx = flash + "/rx.img"
        self.st = self._load()
        rx = self.st["rx"]
        self.received = min(_size(self._rx), rx["size"]) & ~1 if rx else 0

    def _load(self):
        st = {
            "active": "a",
            "previous": "a",
            "trial": False,
            "boots": 0,
            "state": IDLE,
            "error": E_NONE,
            "rx": None,
            "tried": 0,
            "why": "",
        }
        try:
            with open(self._path) as f:
                st.update(json.load(f))
        except (OSError, ValueError):
            pass
        return st

    def _save(self):
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.st, f)
        os.rename(tmp, self._path)

    # -- boot

    def slot_dir(self, name):
        """Where slot ``name`` lives; None for the factory firmware (slot a, never written)."""
        d = self.flash + "/slot_" + name
        return d if _exists(d + "/app.py") or _exists(d + "/app.mpy") else None

    def select(self):
        """The slot directory to run (None: the factory firmware); decides trial and rollback."""
        st = self.st
        if st["trial"]:
            if st["boots"] >= 1:  # it had its boot and never confirmed: crash, hang, power cut
                self.rollback(E_UNCONFIRMED, "restarted before it confirmed")
            else:
                st["boots"] = 1
                st["state"] = TRIAL
                self._save()
                self.trial = True
                self.deadline = time.ticks_add(time.ticks_ms(), self.trial_s * 1000)
        return self.slot_dir(st["active"])

    def rollback(self, error, why):
        st = self.st
        st["active"] = st["previous"]
        st["trial"] = False
        st["boots"] = 0
        st["state"] = ROLLED_BACK
        st["error"] = error
        st["why"] = why[:80]
        self._save()
        self.trial = False

    def confirm(self):
        """The image on trial passed its self-test and a first good exchange: keep it."""
        if not self.trial:
            return
        st = self.st
        st["trial"] = False
        st["boots"] = 0
        st["state"] = CONFIRMED
        st["error"] = E_NONE
        st["why"] = ""
        self._save()
        self.trial = False

    def watchdog(self, wdt):
        return _TrialWatchdog(self, wdt)

    # -- receiving (the control registers and function 21 of the application call these)

    def command(self, cmd, size, version, sha):
        if cmd == CMD_BEGIN:
            self._begin(size, version, sha)
        elif cmd == CMD_COMMIT:
            self._commit()
        elif cmd == CMD_ABORT:
            self._clear_rx(IDLE, E_NONE)
        else:
            raise Refused(ILLEGAL_VALUE)

    def _begin(self, size, version, sha):
        if self.trial or self.st["state"] == REBOOTING:
            raise Refused(BUSY)  # one image at a time: this one has not confirmed yet
        if not 0 < size <= MAX_IMAGE or len(sha) != 32:
            raise Refused(ILLEGAL_VALUE)
        st = self.st
        rx = st["rx"]
        want = {"size": size, "version": version, "sha": _hex(sha)}
        if rx == want:
            st["state"] = RECEIVING  # the same image again: resume where the file ends
            self._save()
            return
        try:
            with open(self._rx, "wb"):
                pass
        except OSError:
            raise Refused(DEVICE_FAILURE)
        self.received = 0
        st["rx"] = want
        st["tried"] = version
        st["state"] = RECEIVING
        st["error"] = E_NONE
        st["why"] = ""
        self._save()

    def write(self, offset, data):
        """Chunk ``data`` at byte ``offset``: the next one, or one already received again."""
        rx = self.st["rx"]
        if rx is None or self.st["state"] != RECEIVING:
            raise Refused(ILLEGAL_ADDRESS)
        if offset > self.received or offset + len(data) > rx["size"] + 1:
            raise Refused(ILLEGAL_ADDRESS)  # a gap, or past the end: read register 50-51
        try:
            with open(self._rx, "r+b") as f:
                f.seek(offset)
                f.write(data)
        except OSError:
            raise Refused(DEVICE_FAILURE)
        self.received = max(self.received, min(offset + len(data), rx["size"]))

    def _commit(self):
        rx = self.st["rx"]
        if rx is None or self.st["state"] != RECEIVING or self.received < rx["size"]:
            raise Refused(ILLEGAL_VALUE)
        if _hex(self._digest(rx["size"])) != rx["sha"]:
            self._clear_rx(REJECTED, E_HASH)
            raise Refused(DEVICE_FAILURE)
        st = self.st
        slot = "b" if st["active"] == "a" else "a"
        target = self.flash + "/slot_" + slot
        try:
            _unpack(self._rx, rx["size"], target + ".new")
        except ValueError:
            _rmtree(target + ".new")
            self._clear_rx(REJECTED, E_ARCHIVE)
            raise Refused(DEVICE_FAILURE)
        except OSError:
            _rmtree(target + ".new")
            self._clear_rx(REJECTED, E_FLASH)
            raise Refused(DEVICE_FAILURE)
        _rmtree(target)
        os.rename(target + ".new", target)
        st["previous"] = st["active"]
        st["active"] = slot
        st["trial"] = True
        st["boots"] = 0
        self._clear_rx(REBOOTING, E_NONE)
        self.reboot = True

    def _digest(self, size):
        h = hashlib.sha256()
        buf = bytearray(1024)
        left = size
        with open(self._rx, "rb") as f:
            while left > 0:
                n = f.readinto(buf)
                if not n:
                    break
                n = min(n, left)
                h.update(buf[:n] if n < len(buf) else buf)
                left -= n
        return h.digest()

    def _clear_rx(self, state, error):
        st = self.st
        st["rx"] = None
        st["state"] = state
        st["error"] = error
        st["why"] = ""
        self.received = 0
        try:
            os.remove(self._rx)
        except OSError:
            pass
        self._save()

    def registers(self, version):
        """Holding registers 48-75: status, then the transfer in progress."""
        st = self.st
        rx = st["rx"] or {"size": 0, "version": 0, "sha": "00" * 32}
        n = self.received
        size = rx["size"]
        sha = bytes(int(rx["sha"][i : i + 2], 16) for i in range(0, 64, 2))
        regs = [
            st["state"],
            st["error"],
            n >> 16,
            n & 0xFFFF,
            version,
            st["tried"],
            CHUNK_MAX,
            1 if self.trial else 0,
            0,  # 56: the command register reads 0
            size >> 16,
            size & 0xFFFF,
            rx["version"],
        ]
        for i in range(0, 32, 2):
            regs.append((sha[i] << 8) | sha[i + 1])
        return regs


class _TrialWatchdog:
    """The application's watchdog, fed by its main loop: while an image is on
    trial it also ends the trial that lasts too long (the previous slot comes back)."""

    def __init__(self, boot, wdt):
        self._boot = boot
        self._wdt = wdt

    def feed(self):
        self._wdt.feed()
        b = self._boot
        if b.trial and time.ticks_diff(time.ticks_ms(), b.deadline) > 0:
            b.rollback(E_UNCONFIRMED, "no confirmation within %d s" % b.trial_s)
            reset()


def _hex(data):
    return "".join("%02x" % b for b in data)


def _unpack(path, size, into):
    """Unpack the slot archive ``path`` (``size`` bytes) into the directory ``into``.

    Entries: name length (1 byte), name, data length (4 bytes, big endian), data.
    Raises ValueError for anything else than plain module files with an app module.
    """
    _rmtree(into)
    os.mkdir(into)
    names = []
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(1)
            if len(head) != 1:
                raise ValueError("truncated")
            name = f.read(head[0]).decode()
            ok = name.endswith(".py") or name.endswith(".mpy")
            if not ok or "/" in name or name.startswith(".") or name in names:
                raise ValueError("bad name")
            raw = f.read(4)
            if len(raw) != 4:
                raise ValueError("truncated")
            n = (raw[0] << 24) | (raw[1] << 16) | (raw[2] << 8) | raw[3]
            pos += 5 + head[0] + n
            if pos > size:
                raise ValueError("truncated")
            with open(into + "/" + name, "wb") as out:
                while n > 0:
                    block = f.read(min(n, 1024))
                    if not block:
                        raise ValueError("truncated")
                    out.write(block)
                    n -= len(block)
            names.append(name)
    if "app.py" not in names and "app.mpy" not in names:
        raise ValueError("no app module")


def _args(argv):
    opts = {}
    i = 0
    while i < len(argv):
        key = argv[i]
        if key.startswith("--") and i + 1 < len(argv):
            opts[key[2:]] = argv[i + 1]
            i += 2
        else:
            raise SystemExit(
                "usage: main.py [--fd N | --port PATH] [--slave N] [--baud B] "
                "[--parity N|E|O] [--state FILE] [--flash DIR] [--trial-s S] [--seed N]"
            )
    return opts


def start(argv):
    """Boot: pick the slot, run its application, reset into a committed image."""
    opts = _args(argv)
    state = opts.get("state") or os.getenv("VITALS_FW_STATE") or "/settings.json"
    opts["state"] = state
    flash = opts.get("flash") or state.rsplit("/", 1)[0] or "/"
    boot = Boot(flash, int(opts.get("trial-s", TRIAL_S)))
    slot = boot.select()
    if slot is not None:
        sys.path.insert(0, slot)
    if boot.st["state"] == ROLLED_BACK and boot.st["why"]:
        print("vitals-fw rolled back:", boot.st["why"])
    try:
        import app

        app.run(opts, boot)
    except Exception as e:  # whatever the image did, the old slot must come back
        if not boot.trial:
            raise
        boot.rollback(E_BOOT_CRASH, "%s: %s" % (type(e).__name__, e))
        sys.print_exception(e)
    reset()
