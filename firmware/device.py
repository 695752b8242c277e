"""The terminal's registers: measurements, diagnostics, settings."""

import time

import regmap as rm
from rtu_slave import DEVICE_FAILURE, ILLEGAL_ADDRESS, ILLEGAL_VALUE, ModbusError


class Terminal:
    """What the Modbus slave reads and writes: the meter, the settings, the counters,
    and the bootloader's update receiver (``boot``: registers 48-75, function 21)."""

    def __init__(self, meter, settings, counters=None, boot=None):
        self.meter = meter
        self.settings = settings
        self.counters = counters
        self.boot = boot
        self.test_fault = 0
        self.boot_ms = time.ticks_ms()
        self._update = [0] * rm.FWU_PARAMS  # 57-75 as last written: size, version, SHA-256
        self.apply_measurement_settings()

    @property
    def reboot_requested(self):
        return self.boot is not None and self.boot.reboot

    def apply_measurement_settings(self):
        a = self.settings.active
        self.meter.averaging_s = a["averaging_s"]
        self.meter.weighting = a["weighting"]
        self.meter.cal_offset = a["cal_offset"]

    def uptime_s(self):
        return time.ticks_diff(time.ticks_ms(), self.boot_ms) // 1000

    def read_input(self, addr, count):
        if addr + count > rm.IR_COUNT:
            raise ModbusError(ILLEGAL_ADDRESS)
        m = self.meter
        if addr < rm.IR_STATUS and (m.fault or self.test_fault):
            raise ModbusError(DEVICE_FAILURE)  # no trustworthy measurement to give
        up = self.uptime_s()
        c = self.counters
        status = m.status | (rm.STATUS_FAULT if (m.fault or self.test_fault) else 0)
        regs = (
            m.laeq,
            m.lafmax,
            m.lafmin,
            m.lcpeak,
            m.la10,
            m.la50,
            m.la90,
            status,
            (up >> 16) & 0xFFFF,
            up & 0xFFFF,
            c.bus_messages & 0xFFFF if c else 0,
            c.crc_errors & 0xFFFF if c else 0,
            c.exceptions & 0xFFFF if c else 0,
            rm.FW_VERSION,
        )
        return regs[addr : addr + count]

    def read_holding(self, addr, count):
        if self.boot is not None and rm.FWU_FIRST <= addr and addr + count <= rm.FWU_LAST + 1:
            first = addr - rm.FWU_FIRST
            return self.boot.registers(rm.FW_VERSION)[first : first + count]
        if addr < rm.HR_FIRST or addr + count > rm.HR_LAST + 1:
            raise ModbusError(ILLEGAL_ADDRESS)
        s = self.settings.saved
        regs = (
            s["averaging_s"],
            s["weighting"],
            s["cal_offset"] & 0xFFFF,
            s["slave"],
            s["baud"] // 100,
            rm.PARITIES.index(s["parity"]),
            rm.FW_VERSION,
            self.test_fault,
        )
        first = addr - rm.HR_FIRST
        return regs[first : first + count]

    def write_holding(self, addr, values):
        if self.boot is not None and addr >= rm.FWU_COMMAND:
            return self._update_command(addr, values)
        if addr < rm.HR_FIRST or addr + len(values) > rm.HR_LAST + 1:
            raise ModbusError(ILLEGAL_ADDRESS)
        changes = []  # validate all before applying any
        for i, v in enumerate(values):
            a = addr + i
            if a == rm.HR_AVERAGING_S:
                if not 1 <= v <= 3600:
                    raise ModbusError(ILLEGAL_VALUE)
                changes.append(("averaging_s", v, True))
            elif a == rm.HR_WEIGHTING:
                if v > 2:
                    raise ModbusError(ILLEGAL_VALUE)
                changes.append(("weighting", v, True))
            elif a == rm.HR_CAL_OFFSET:
                sv = v - 0x10000 if v & 0x8000 else v
                if not -100 <= sv <= 100:
                    raise ModbusError(ILLEGAL_VALUE)
                changes.append(("cal_offset", sv, True))
            elif a == rm.HR_SLAVE:
                if not 1 <= v <= 247:
                    raise ModbusError(ILLEGAL_VALUE)
                changes.append(("slave", v, False))
            elif a == rm.HR_BAUD:
                if v * 100 not in rm.BAUDS:
                    raise ModbusError(ILLEGAL_VALUE)
                changes.append(("baud", v * 100, False))
            elif a == rm.HR_PARITY:
                if v > 2:
                    raise ModbusError(ILLEGAL_VALUE)
                changes.append(("parity", rm.PARITIES[v], False))
            elif a == rm.HR_TEST_FAULT:
                if v > 1:
                    raise ModbusError(ILLEGAL_VALUE)
                changes.append(("test_fault", v, True))
            else:  # the firmware version is read only
                raise ModbusError(ILLEGAL_ADDRESS)
        persist = False
        for key, v, now in changes:
            if key == "test_fault":
                self.test_fault = v  # never persisted: a reset clears it
                continue
            self.settings.set(key, v, now)
            persist = True
        if persist:
            try:
                self.settings.save()
            except OSError as e:
                raise ModbusError(DEVICE_FAILURE) from e
        self.apply_measurement_settings()

    def _update_command(self, addr, values):
        """Registers 56-75: the parameters are kept; a write of 56 runs the command."""
        if addr + len(values) > rm.FWU_LAST + 1:
            raise ModbusError(ILLEGAL_ADDRESS)
        for i, v in enumerate(values):
            if addr + i > rm.FWU_COMMAND:
                self._update[addr + i - rm.FWU_COMMAND - 1] = v
        if addr != rm.FWU_COMMAND:
            return
        p = self._update
        sha = bytearray(32)
        for i in range(16):
            sha[2 * i] = p[3 + i] >> 8
            sha[2 * i + 1] = p[3 + i] & 0xFF
        self._call(self.boot.command, values[0], (p[0] << 16) | p[1], p[2], bytes(sha))

    def write_file(self, file, record, data):
        """Function 21: file 1.., 10000 two-byte records each, is the image being received."""
        if self.boot is None or file < 1:
            raise ModbusError(ILLEGAL_ADDRESS)
        self._call(self.boot.write, ((file - 1) * 10000 + record) * 2, data)

    def _call(self, fn, *args):
        from bootloader import Refused

        try:
            fn(*args)
        except Refused as e:
            raise ModbusError(e.args[0])

    def ident(self):
        return [
            (0, rm.VENDOR.encode()),
            (1, rm.PRODUCT_CODE.encode()),
            (2, ("%d.%d" % (rm.FW_MAJOR, rm.FW_MINOR)).encode()),
            (3, rm.VENDOR_URL.encode()),
            (4, rm.PRODUCT_NAME.encode()),
            (5, rm.PRODUCT_CODE.encode()),
        ]
