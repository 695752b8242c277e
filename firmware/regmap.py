"""Register map of the VX-SLM-1 sound level meter (drivers/profiles/sound_level_meter.toml).

Addresses are 0-based protocol addresses. ``POINTS`` is the table a CPython
test compares with the profile: (name, space, address, type, scale, bit).
"""

from micropython import const

FW_MAJOR = const(1)
FW_MINOR = const(0)
FW_VERSION = const(100)  # major * 100 + minor, holding register 38

VENDOR = "vitals reference terminal"
PRODUCT_CODE = "VX-SLM-1"
PRODUCT_NAME = "Class 2 sound level meter"
VENDOR_URL = "https://example.invalid/vitals"

# input registers (function 04): measurements, then diagnostics
IR_LAEQ = const(0)
IR_LAFMAX = const(1)
IR_LAFMIN = const(2)
IR_LCPEAK = const(3)
IR_LA10 = const(4)
IR_LA50 = const(5)
IR_LA90 = const(6)
IR_STATUS = const(7)  # bit 0 overload, bit 1 under range, bit 2 sensor fault
IR_UPTIME_HI = const(8)  # u32 seconds since power-up, high word first
IR_UPTIME_LO = const(9)
IR_FRAMES_GOOD = const(10)  # diagnostics: frames with a good CRC (any slave), mod 65536
IR_CRC_ERRORS = const(11)  # frames dropped for a bad CRC or a short length
IR_EXCEPTIONS = const(12)  # exception responses sent
IR_FW_VERSION = const(13)  # same as HR_FW_VERSION, here for one-read diagnostics
IR_COUNT = const(14)

STATUS_OVERLOAD = const(1)
STATUS_UNDER_RANGE = const(2)
STATUS_FAULT = const(4)

# holding registers (function 03 / 06 / 16): configuration and settings
HR_FIRST = const(32)
HR_AVERAGING_S = const(32)  # 1..3600
HR_WEIGHTING = const(33)  # 0 A, 1 C, 2 Z
HR_CAL_OFFSET = const(34)  # i16, 0.1 dB, -100..100
HR_SLAVE = const(35)  # 1..247, applied after a restart
HR_BAUD = const(36)  # baud / 100 (96 = 9600), applied after a restart
HR_PARITY = const(37)  # 0 none, 1 even, 2 odd, applied after a restart
HR_FW_VERSION = const(38)  # read only
HR_TEST_FAULT = const(39)  # bench self-test: 1 = report a sensor fault (exception 04)
HR_LAST = const(39)

# firmware update control block (holding registers, served by the bootloader; docs/firmware.md)
FWU_FIRST = const(48)  # 48 state, 49 error, 50-51 bytes received (u32), 52 running version,
# 53 version of the last image received, 54 largest chunk (bytes), 55 1 while on trial
FWU_COMMAND = const(56)  # write: 1 begin, 2 commit, 3 abort (with 57-75 written before or along)
FWU_PARAMS = const(19)  # 57-58 image size (u32), 59 its version, 60-75 its SHA-256
FWU_LAST = const(75)

BAUDS = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
PARITIES = ("N", "E", "O")

POINTS = (
    ("laeq", "input", IR_LAEQ, "u16", 0.1, 0),
    ("lafmax", "input", IR_LAFMAX, "u16", 0.1, 0),
    ("lafmin", "input", IR_LAFMIN, "u16", 0.1, 0),
    ("lcpeak", "input", IR_LCPEAK, "u16", 0.1, 0),
    ("la10", "input", IR_LA10, "u16", 0.1, 0),
    ("la50", "input", IR_LA50, "u16", 0.1, 0),
    ("la90", "input", IR_LA90, "u16", 0.1, 0),
    ("overload", "input", IR_STATUS, "bit", 1.0, 0),
    ("under_range", "input", IR_STATUS, "bit", 1.0, 1),
    ("uptime", "input", IR_UPTIME_HI, "u32", 1.0, 0),
    ("averaging_s", "holding", HR_AVERAGING_S, "u16", 1.0, 0),
    ("weighting", "holding", HR_WEIGHTING, "u16", 1.0, 0),
    ("calibration_offset", "holding", HR_CAL_OFFSET, "i16", 0.1, 0),
    ("firmware_version", "holding", HR_FW_VERSION, "u16", 1.0, 0),
)

# registers the firmware serves that the profile does not (yet) list
EXTRA_POINTS = (
    ("sensor_fault", "input", IR_STATUS, "bit", 1.0, 2),
    ("frames_good", "input", IR_FRAMES_GOOD, "u16", 1.0, 0),
    ("crc_errors", "input", IR_CRC_ERRORS, "u16", 1.0, 0),
    ("exceptions_sent", "input", IR_EXCEPTIONS, "u16", 1.0, 0),
    ("firmware_version_ir", "input", IR_FW_VERSION, "u16", 1.0, 0),
    ("slave_address", "holding", HR_SLAVE, "u16", 1.0, 0),
    ("baud_div100", "holding", HR_BAUD, "u16", 1.0, 0),
    ("parity", "holding", HR_PARITY, "u16", 1.0, 0),
    ("test_fault", "holding", HR_TEST_FAULT, "u16", 1.0, 0),
)
