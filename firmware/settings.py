"""Settings kept in a JSON file in flash: written over Modbus, applied after a reset."""

import json

DEFAULTS = {
    "slave": 1,
    "baud": 9600,
    "parity": "N",
    "averaging_s": 1,
    "weighting": 0,
    "cal_offset": 0,  # 0.1 dB
}


class Settings:
    """The settings in force (``active``) and what the next reset applies
    (``saved``, mirrored in ``path``). Measurement settings apply at once."""

    def __init__(self, path, defaults=None):
        self.path = path
        base = dict(DEFAULTS)
        if defaults:
            base.update(defaults)
        self.saved = self._load(base)
        self.active = dict(self.saved)

    def _load(self, base):
        try:
            with open(self.path) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            return base
        if isinstance(stored, dict):
            for key in base:
                if key in stored and type(stored[key]) is type(base[key]):
                    base[key] = stored[key]
        return base

    def set(self, key, value, now=False):
        """Store ``key``; with ``now`` it is also in force at once."""
        self.saved[key] = value
        if now:
            self.active[key] = value

    def save(self):
        """Write the saved settings; raise OSError if flash refuses."""
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.saved, f)
        try:
            import os

            os.rename(tmp, self.path)
        except OSError:
            with open(self.path, "w") as f:
                json.dump(self.saved, f)

    def reload(self):
        """What a reset does: the saved settings come into force."""
        self.active = dict(self.saved)
