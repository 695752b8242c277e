"""Device profiles: every shipped one loads, broken ones say exactly what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drivers.profiles import (
    SENSOR_QUANTITIES,
    SHIPPED_DIR,
    Point,
    Profile,
    available_profiles,
    load_profile,
)
from protocols.errors import ConfigError, LocalError
from protocols.modbus import DataType, Order, Space, plan, register_count

SHIPPED = [
    "gas_detector",
    "manhole_sensor",
    "multi_sensor_air_box",
    "pm_monitor",
    "pump_meter",
    "radar_water_level",
    "rain_gauge",
    "sound_level_meter",
    "weather_station",
]
SENSORS = ["gps_nmea", "pms5003", "sds011"]  # serial sensors: no registers, quantities
ALL = sorted(SHIPPED + SENSORS)


def test_available_profiles_lists_every_shipped_file() -> None:
    assert available_profiles() == ALL
    assert sorted(p.stem for p in SHIPPED_DIR.glob("*.toml")) == ALL


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_plans(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.model and profile.vendor and profile.datasheet
    assert profile.points
    assert len({p.name for p in profile.points}) == len(profile.points)
    for point in profile.points:
        assert point.domain and point.cls and point.indicator, point.name
    requests = plan(
        profile.specs,
        max_registers=profile.max_registers,
        max_bits=profile.max_bits,
        max_gap=profile.max_gap,
    )
    # clustered like real devices: a handful of requests serve every point
    assert 1 <= len(requests) <= 5
    for req in requests:
        assert req.count <= profile.max_registers


@pytest.mark.parametrize("name", SENSORS)
def test_sensor_profiles_name_quantities_of_their_parser(name: str) -> None:
    profile = load_profile(name)
    assert profile.is_sensor and profile.protocol in SENSOR_QUANTITIES
    assert {p.name for p in profile.points} <= SENSOR_QUANTITIES[profile.protocol]
    assert all(p.domain and p.cls and p.indicator for p in profile.points)
    assert not load_profile("sound_level_meter").is_sensor


SENSOR_HEAD = '[profile]\nmodel = "M"\nvendor = "V"\nprotocol = "sds011"\n'


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (
            '[[points]]\nname = "pm25"\n',
            "points[0].name: 'pm25' is not a quantity of a sds011 sensor "
            "(did you mean 'pm2_5'?); known: pm10, pm2_5",
        ),
        (
            '[[points]]\nname = "pm10"\nspace = "input"\n',
            "points[0].space: unknown key",
        ),
        (
            '[[points]]\nname = "pm10"\nrange = [5, 1]\n',
            "points[0].range: low 5 must be below high 1",
        ),
    ],
)
def test_broken_sensor_profiles(tmp_path: Path, points: str, message: str) -> None:
    f = tmp_path / "box.toml"
    f.write_text(SENSOR_HEAD + points)
    with pytest.raises(ConfigError) as info:
        load_profile(f)
    assert any(
        msg == message.split(": ", 1)[1] and where.endswith(message.split(": ", 1)[0])
        for where, msg in info.value.problems
    ), info.value.problems


def test_shipped_profiles_exercise_every_type_and_order() -> None:
    types: set[DataType] = set()
    orders: set[Order] = set()
    for name in SHIPPED:
        for p in load_profile(name).points:
            types.add(p.spec.type)
            if register_count(p.spec) > 1 and p.spec.type is not DataType.STRING:
                orders.add(p.spec.order)
    assert types == set(DataType)
    assert orders == set(Order)


# The MicroPython firmware serves exactly this map: (name, space, address,
# type, bit, scale, unit, range, writable, interval_s).
SOUND_LEVEL_METER = [
    ("laeq", "input", 0, "u16", 0, 0.1, "dB(A)", (20.0, 140.0), False, None),
    ("lafmax", "input", 1, "u16", 0, 0.1, "dB(A)", (20.0, 140.0), False, None),
    ("lafmin", "input", 2, "u16", 0, 0.1, "dB(A)", (20.0, 140.0), False, None),
    ("lcpeak", "input", 3, "u16", 0, 0.1, "dB(C)", (30.0, 143.0), False, None),
    ("la10", "input", 4, "u16", 0, 0.1, "dB(A)", (20.0, 140.0), False, 60.0),
    ("la50", "input", 5, "u16", 0, 0.1, "dB(A)", (20.0, 140.0), False, 60.0),
    ("la90", "input", 6, "u16", 0, 0.1, "dB(A)", (20.0, 140.0), False, 60.0),
    ("overload", "input", 7, "bit", 0, 1.0, "", None, False, None),
    ("under_range", "input", 7, "bit", 1, 1.0, "", None, False, None),
    ("uptime", "input", 8, "u32", 0, 1.0, "s", None, False, 60.0),
    ("averaging_s", "holding", 32, "u16", 0, 1.0, "s", (1.0, 3600.0), True, 300.0),
    ("weighting", "holding", 33, "u16", 0, 1.0, "", (0.0, 2.0), True, 300.0),
    ("calibration_offset", "holding", 34, "i16", 0, 0.1, "dB", (-10.0, 10.0), True, 300.0),
    ("firmware_version", "holding", 38, "u16", 0, 1.0, "", None, False, 3600.0),
]


def test_sound_level_meter_register_map_point_by_point() -> None:
    profile = load_profile("sound_level_meter")
    assert profile.interval_s == 1.0
    assert profile.max_registers == 40
    got = [
        (
            p.name,
            p.spec.space.value,
            p.spec.address,
            p.spec.type.value,
            p.spec.bit,
            p.spec.scale,
            p.unit,
            p.range,
            p.writable,
            p.interval_s,
        )
        for p in profile.points
    ]
    assert got == SOUND_LEVEL_METER
    for p in profile.points:
        assert p.spec.order is Order.ABCD
        assert p.spec.offset == 0.0
        assert p.spec.address + register_count(p.spec) <= 40  # what the firmware serves
    assert profile.point("laeq").indicator == "LAeq"
    assert profile.point("laeq").in_range(55.0)
    assert not profile.point("laeq").in_range(141.0)
    with pytest.raises(LocalError, match="no point named 'nope'"):
        profile.point("nope")


def test_pump_meter_follows_sdm630_map() -> None:
    profile = load_profile("pump_meter")
    addresses = {p.name: p.spec.address for p in profile.points}
    assert addresses["voltage_l1"] == 0x0000
    assert addresses["current_l1"] == 0x0006
    assert addresses["power_l1"] == 0x000C
    assert addresses["power_total"] == 0x0034
    assert addresses["frequency"] == 0x0046
    assert addresses["energy_import"] == 0x0048
    assert addresses["energy_total"] == 0x0156
    for p in profile.points:
        assert p.spec.space is Space.INPUT
        if p.spec.type is DataType.F32:
            assert p.spec.order is Order.ABCD
    wh = profile.point("energy_total_wh")
    assert (wh.spec.type, wh.spec.order) == (DataType.U64, Order.CDAB)


# -- broken profiles -------------------------------------------------------------

HEAD = """\
[profile]
model = "M"
vendor = "V"
"""
POINT = """\
[[points]]
name = "p"
space = "input"
address = 0
type = "u16"
"""

BROKEN = [
    (
        "unknown type, did you mean",
        HEAD + POINT.replace('"u16"', '"f23"'),
        [
            (
                "points[0].type",
                "unknown type 'f23' (did you mean 'f32'?); expected one of: bool, u16, i16, "
                "u32, i32, u64, i64, f32, f64, string, bit",
            )
        ],
    ),
    (
        "missing profile table",
        POINT,
        [("profile", "missing required table [profile]")],
    ),
    (
        "missing required keys",
        HEAD + '[[points]]\nname = "p"\n',
        [
            ("points[0].space", "missing required key"),
            ("points[0].address", "missing required key"),
            ("points[0].type", "missing required key"),
        ],
    ),
    (
        "no points",
        HEAD,
        [("points", "missing required array of tables [[points]]")],
    ),
    (
        "wrong type of value",
        HEAD + POINT.replace("address = 0", 'address = "0x10"'),
        [("points[0].address", "expected integer, got string '0x10'")],
    ),
    (
        "address past the end",
        HEAD + POINT.replace("address = 0", "address = 65535").replace('"u16"', '"f32"'),
        [("points[0].address", "f32 at 65535 needs 2 registers, past the last address 65535")],
    ),
    (
        "address out of range",
        HEAD + POINT.replace("address = 0", "address = 70000"),
        [("points[0].address", "value 70000 out of range 0..65535")],
    ),
    (
        "bit out of range",
        HEAD + POINT.replace('"u16"', '"bit"') + "bit = 16\n",
        [("points[0].bit", "value 16 out of range 0..15")],
    ),
    (
        "bit missing",
        HEAD + POINT.replace('"u16"', '"bit"'),
        [
            (
                "points[0].bit",
                "missing required key (bit number 0..15, 0 = least significant)",
            )
        ],
    ),
    (
        "string too long",
        HEAD + POINT.replace('"u16"', '"string"') + "length = 124\n",
        [("points[0].length", "value 124 out of range 1..123")],
    ),
    (
        "length on a number",
        HEAD + POINT + "length = 2\n",
        [("points[0].length", "'length' applies only to type 'string', not 'u16'")],
    ),
    (
        "duplicate point name",
        HEAD + POINT + POINT.replace("address = 0", "address = 1"),
        [("points[1].name", "duplicate point name 'p' (also points[0])")],
    ),
    (
        "non-bool in a bit space",
        HEAD + POINT.replace('"input"', '"coil"'),
        [
            (
                "points[0].type",
                "a 'coil' point holds one bit: type must be 'bool', not 'u16'",
            )
        ],
    ),
    (
        "writable input register",
        HEAD + POINT + "writable = true\n",
        [("points[0].writable", "only holding and coil points can be writable, not 'input'")],
    ),
    (
        "range low not below high",
        HEAD + POINT + "range = [10, 5]\n",
        [("points[0].range", "low 10 must be below high 5")],
    ),
    (
        "range not a pair",
        HEAD + POINT + "range = [1]\n",
        [("points[0].range", "expected [low, high], two numbers")],
    ),
    (
        "scale zero",
        HEAD + POINT + "scale = 0\n",
        [("points[0].scale", "scale must not be 0")],
    ),
    (
        "scale on a string",
        HEAD + POINT.replace('"u16"', '"string"') + "length = 4\nscale = 0.1\n",
        [("points[0].scale", "'scale' applies only to numeric types, not 'string'")],
    ),
    (
        "unknown key, did you mean",
        HEAD + POINT + "adress = 3\n",
        [("points[0].adress", "unknown key (did you mean 'address'?)")],
    ),
    (
        "unknown profile key",
        HEAD + "max_register = 10\n" + POINT,
        [("profile.max_register", "unknown key (did you mean 'max_registers'?)")],
    ),
    (
        "max_registers out of range",
        HEAD + "max_registers = 126\n" + POINT,
        [("profile.max_registers", "value 126 out of range 1..125")],
    ),
    (
        "bad point name",
        HEAD + POINT.replace('name = "p"', 'name = "LAeq"'),
        [
            (
                "points[0].name",
                "invalid value 'LAeq': use lower-case letters, digits and '_'",
            )
        ],
    ),
    (
        "bad order",
        HEAD + 'order = "ABCE"\n' + POINT,
        [
            (
                "profile.order",
                "unknown order 'ABCE' (did you mean 'ABCD'?); expected one of: ABCD, DCBA, "
                "BADC, CDAB",
            )
        ],
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_profile_reports_precise_problem(
    tmp_path: Path, case: str, text: str, expected: list[tuple[str, str]]
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.problems == [(f"{path}: {key}", msg) for key, msg in expected], case


def test_all_problems_of_a_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "weather_station.toml"
    path.write_text(
        HEAD
        + POINT
        + POINT.replace('name = "p"', 'name = "q"').replace('"u16"', '"f23"')
        + "unit = 3\n"
        + POINT.replace('name = "p"', 'name = "r"').replace("address = 0", "address = -1")
    )
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    keys = [where.removeprefix(f"{path}: ") for where, _ in info.value.problems]
    assert keys == ["points[1].type", "points[1].unit", "points[2].address"]
    assert "points[1].type: unknown type 'f23' (did you mean 'f32'?)" in str(info.value)


def test_shipped_profile_problems_name_the_file_only(tmp_path: Path) -> None:
    # bare names resolve in the search dirs first; a user's file shows its full path
    (tmp_path / "sound_level_meter.toml").write_text(HEAD + POINT.replace('"u16"', '"f23"'))
    with pytest.raises(ConfigError) as info:
        load_profile("sound_level_meter", search=[tmp_path])
    assert info.value.problems[0][0] == f"{tmp_path / 'sound_level_meter.toml'}: points[0].type"


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(HEAD + "[[points]]\nname = \n")
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert info.value.problems == [(f"{path}:5:8", "TOML syntax error: Invalid value")]


def test_unknown_profile_name_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("sound_meter")
    ((where, msg),) = info.value.problems
    assert where == "sound_meter"
    assert msg == (
        "no such profile (did you mean 'sound_level_meter'?); available: " + ", ".join(ALL)
    )


def test_search_dirs_come_first_and_extend_the_list(tmp_path: Path) -> None:
    (tmp_path / "pump_meter.toml").write_text(HEAD + POINT)
    (tmp_path / "custom_box.toml").write_text(HEAD + POINT)
    assert load_profile("pump_meter", search=[tmp_path]).model == "M"
    assert load_profile("pump_meter").model == "SDM630-Modbus V2"
    assert "custom_box" in available_profiles([tmp_path])
    assert "custom_box" not in available_profiles()


def test_cache_reloads_an_edited_file(tmp_path: Path) -> None:
    path = tmp_path / "dev.toml"
    path.write_text(HEAD + POINT)
    first = load_profile(path)
    assert load_profile(path) is first  # cached
    path.write_text(HEAD.replace('"M"', '"M2"') + POINT)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = load_profile(path)
    assert second.model == "M2"
    assert isinstance(second, Profile)


def test_defaults_and_per_point_overrides(tmp_path: Path) -> None:
    path = tmp_path / "dev.toml"
    path.write_text(
        HEAD
        + 'order = "CDAB"\ninterval_s = 2\n'
        + POINT.replace('"u16"', '"f32"')
        + POINT.replace('name = "p"', 'name = "q"').replace("address = 0", "address = 2")
        + 'order = "ABCD"\ninterval_s = 60\nclass = "noise"\n'
    )
    profile = load_profile(path)
    p, q = profile.points
    assert isinstance(p, Point)
    assert (p.spec.order, p.interval_s) == (Order.CDAB, None)
    assert (q.spec.order, q.interval_s, q.cls) == (Order.ABCD, 60.0, "noise")
    assert (profile.interval_s, profile.max_registers, profile.max_gap) == (2.0, 125, 0)
