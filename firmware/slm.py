"""Sound level meter driver: an analog SPL front end read through an ADC.

The driver is handed its ADC (anything with ``read_u16()``), as micropython-lib
drivers are handed their bus. The front end (an RMS detector with a log output,
as on the common analog noise modules) gives 0.6 V at 30 dB(A) and 20 mV/dB up
to 130 dB(A) (2.6 V); 3.3 V full scale. ``SimulatedAdc`` is the unix backend:
it produces the voltage a street would: LAeq 35–80 dB(A) with a daily cycle and
random bursts (a bus, a siren, a party).
"""

import math
import random
import time

from micropython import const

_V_REF_MV = const(3300)
_V_30DB_MV = const(600)
_MV_PER_DB = const(20)
_DB_MIN = const(30)
_DB_OVERLOAD = const(130)
FAST_MS = const(125)  # "fast" time weighting: one sample per 125 ms

WEIGHTING_OFFSET = (0.0, 1.5, 3.0)  # A, C, Z: low frequencies count more in C and Z


def db_to_u16(db):
    mv = _V_30DB_MV + (db - _DB_MIN) * _MV_PER_DB
    mv = min(max(mv, 0), _V_REF_MV)
    return int(mv * 65535 // _V_REF_MV)


def u16_to_db(raw):
    mv = raw * _V_REF_MV / 65535
    return _DB_MIN + (mv - _V_30DB_MV) / _MV_PER_DB


class SimulatedAdc:
    """A duck-typed ``machine.ADC`` that reads the street's noise."""

    def __init__(self, seed=None, clock=None):
        if seed is not None:
            random.seed(seed)
        self._clock = clock or time.time
        self._burst_until = 0.0
        self._burst_db = 0.0
        self._wander = 0.0
        self.fault = False

    def level(self):
        t = self._clock()
        hour = (t % 86400) / 3600
        # daily cycle: quiet at 03:00 (about 40 dB), busiest mid-afternoon (about 62 dB)
        base = 51 + 11 * math.sin((hour - 9) * math.pi / 12)
        self._wander = 0.95 * self._wander + random.uniform(-1.0, 1.0)
        level = base + self._wander + random.uniform(-2.0, 2.0)
        if t >= self._burst_until and random.random() < 0.004:  # about one burst a minute
            self._burst_until = t + random.uniform(1, 6)
            self._burst_db = random.uniform(8, 22)
        if t < self._burst_until:
            level += self._burst_db
        return min(max(level, 35.0), 80.0)

    def read_u16(self):
        if self.fault:
            return 0  # a broken wire reads as ground
        return db_to_u16(self.level())


class SoundLevelMeter:
    """Turns fast samples into period and minute statistics, in 0.1 dB."""

    def __init__(self, adc):
        self.adc = adc
        self.averaging_s = 1
        self.weighting = 0
        self.cal_offset = 0  # 0.1 dB
        self.fault = False
        self._energy = 0.0
        self._n = 0
        self._max = -1.0
        self._min = 999.0
        self._overload = False
        self._under = False
        self._period_start = time.ticks_ms()
        self._minute = []  # LAeq of the last 60 seconds, one a second
        self._second_energy = 0.0
        self._second_n = 0
        self._second_start = time.ticks_ms()
        # published values (0.1 dB), zero until the first period closes
        self.laeq = self.lafmax = self.lafmin = self.lcpeak = 0
        self.la10 = self.la50 = self.la90 = 0
        self.status = 0

    def sample(self):
        """Take one fast sample; call every ``FAST_MS``."""
        raw = self.adc.read_u16()
        if raw < 64:
            self.fault = True
            return
        self.fault = False
        db = u16_to_db(raw)
        if db < _DB_MIN:
            self._under = True
            db = _DB_MIN
        if db >= _DB_OVERLOAD:
            self._overload = True
        db += WEIGHTING_OFFSET[self.weighting] + self.cal_offset / 10
        e = math.pow(10, db / 10)
        self._energy += e
        self._n += 1
        self._second_energy += e
        self._second_n += 1
        self._max = max(self._max, db)
        self._min = min(self._min, db)
        now = time.ticks_ms()
        if time.ticks_diff(now, self._second_start) >= 1000:
            self._second_start = now
            self._minute.append(10 * math.log10(self._second_energy / self._second_n))
            self._second_energy = 0.0
            self._second_n = 0
            if len(self._minute) > 60:
                self._minute.pop(0)
            self._percentiles()
        if self.laeq == 0 or time.ticks_diff(now, self._period_start) >= self.averaging_s * 1000:
            self._period_start = now
            self._close_period()

    def _close_period(self):
        laeq = 10 * math.log10(self._energy / self._n)
        self.laeq = _d(laeq)
        self.lafmax = _d(self._max)
        self.lafmin = _d(self._min)
        self.lcpeak = _d(self._max + 4.5 + WEIGHTING_OFFSET[1])
        self.status = (1 if self._overload else 0) | (2 if self._under else 0)
        self._energy = 0.0
        self._n = 0
        self._max = -1.0
        self._min = 999.0
        self._overload = self._under = False

        if not self.la50:  # the first second: the minute so far is this period
            self.la10 = self.la50 = self.la90 = self.laeq

    def _percentiles(self):
        s = sorted(self._minute)
        n = len(s)
        self.la10 = _d(s[min(n - 1, int(n * 0.9))])
        self.la50 = _d(s[int(n * 0.5)])
        self.la90 = _d(s[int(n * 0.1)])


def _d(db):
    return int(db * 10 + 0.5)
