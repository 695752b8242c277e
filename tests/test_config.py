"""Gateway configuration: good files load, broken ones say exactly what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.ops.config import Config, check, load_config
from protocols.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"

GATEWAY = '[gateway]\nid = "gw-0001"\n'
RTU = '[[buses]]\nname = "rs485-1"\nkind = "rtu"\nport = "/dev/ttyUSB0"\n'
TCP = '[[buses]]\nname = "lan"\nkind = "tcp"\nhost = "10.0.0.5"\n'
NOISE = '[[devices]]\nname = "noise-1"\nbus = "rs485-1"\nprofile = "sound_level_meter"\nslave = 1\n'
GOOD = GATEWAY + RTU + NOISE


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["gateway-minimal.toml", "gateway-full.toml"])
def test_examples_load_cleanly(name: str) -> None:
    config = load_config(EXAMPLES / name)
    assert config.gateway.id == "gw-0001"
    assert config.devices
    code, text = check(EXAMPLES / name)
    assert code == 0
    assert json.loads(text)["gateway"]["id"] == "gw-0001"


def test_full_example_resolves_every_section() -> None:
    config = load_config(EXAMPLES / "gateway-full.toml")
    assert [b.kind for b in config.buses] == ["rtu", "tcp", "rtu-over-tcp"]
    assert config.bus("river-bridge").baud == 19200
    assert config.device("pump-station-7").slave == 255
    assert not config.device("manhole-12").enabled
    assert [d.name for d in config.devices_on("rs485-1")] == ["noise-1", "weather-1", "pm-1"]
    assert config.uplink.client_id == "vitals-gw-0001"
    assert config.spool.durability == "full"
    assert config.batch.encoding == "msgpack+zlib"


def test_point_ids_follow_device_then_profile_order(tmp_path: Path) -> None:
    text = (
        GOOD
        + NOISE.replace("noise-1", "off").replace("slave = 1", "slave = 9")
        + "enabled = false\n"
        + NOISE.replace("noise-1", "noise-2").replace("slave = 1", "slave = 2")
    )
    config = load_config(write(tmp_path, text))
    n = len(config.device("noise-1").profile.points)
    assert len(config.points) == 2 * n  # the disabled device gets no ids
    assert list(config.points) == list(range(2 * n))
    dev, point = config.points[0]
    assert (dev.name, point.name) == ("noise-1", "laeq")
    dev, point = config.points[n]
    assert (dev.name, point.name) == ("noise-2", "laeq")
    assert config.point_ids[("noise-2", "la10")] == n + 4
    assert ("off", "laeq") not in config.point_ids
    # the table is computed, not stored: it must agree with the naive one everywhere
    naive = [(d, p) for d in config.devices if d.enabled for p in d.profile.points]
    assert [config.points[i] for i in range(len(naive))] == naive
    assert dict(config.point_ids) == {(d.name, p.name): i for i, (d, p) in enumerate(naive)}
    assert len(config.point_ids) == len(naive)
    for bad in (-1, 2 * n, "0", 1.0, None):
        assert bad not in config.points
        with pytest.raises(KeyError):
            config.points[bad]  # type: ignore[index]
    for missing in (("noise-2", "nope"), ("nope", "laeq"), ("noise-2",), "noise-2"):
        assert missing not in config.point_ids
    of = config.points.of(config.device("noise-2"))
    assert list(of) == [(n + i, p) for i, p in enumerate(config.device("noise-2").profile.points)]
    assert of[-1] == (2 * n - 1, config.device("noise-2").profile.points[-1])
    assert list(of[1:3]) == list(of)[1:3]


def test_intervals_resolve_device_then_profile(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD + "interval_s = 2.5\n"))
    dev = config.device("noise-1")
    assert dev.interval_s == 2.5
    assert dev.interval_of(dev.profile.point("laeq")) == 2.5
    assert dev.interval_of(dev.profile.point("la10")) == 60.0  # fixed by the profile
    config = load_config(write(tmp_path, GOOD))
    assert config.device("noise-1").interval_s == 1.0  # the profile's default


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "my_box.toml").write_text(
        '[profile]\nmodel = "B"\nvendor = "V"\n'
        '[[points]]\nname = "x"\nspace = "holding"\naddress = 0\ntype = "u16"\n'
    )
    text = (
        GATEWAY
        + 'state_dir = "state"\nprofile_dirs = ["profiles"]\n'
        + RTU
        + NOISE.replace("sound_level_meter", "my_box")
    )
    config = load_config(write(tmp_path, text))
    assert config.gateway.state_dir == tmp_path / "state"
    assert config.gateway.profile_dirs == (tmp_path / "profiles",)
    assert config.device("noise-1").profile.model == "B"


def test_to_dict_hides_the_password(tmp_path: Path) -> None:
    text = GATEWAY + '[uplink]\nusername = "gw"\npassword = "hunter2"\n' + RTU + NOISE
    config = load_config(write(tmp_path, text))
    assert config.uplink.password == "hunter2"
    assert "hunter2" not in repr(config)
    data = config.to_dict()
    assert data["uplink"]["password"] == "***"
    code, out = check(tmp_path / "gw.toml")
    assert code == 0
    assert "hunter2" not in out


def test_frame_gap_defaults_to_t35() -> None:
    config = load_config(EXAMPLES / "gateway-full.toml")
    assert config.bus("rs485-1").frame_gap_s == pytest.approx(3.5 * 11 / 9600)
    assert config.bus("lan").frame_gap_s == 0.0
    assert config.bus("river-bridge").frame_gap_s == pytest.approx(3.5 * 11 / 19200)
    bus = load_config(EXAMPLES / "gateway-minimal.toml").buses[0]
    assert bus.frame_gap_s == pytest.approx(3.5 * 11 / 9600)


# -- broken configs: (case, text, [(key path, message)]) --------------------------

BROKEN: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "missing gateway table",
        RTU + NOISE,
        [("gateway", "missing required table [gateway]")],
    ),
    (
        "bad gateway id",
        GOOD.replace("gw-0001", "GW_1"),
        [
            (
                "gateway.id",
                "invalid value 'GW_1': use a-z, 0-9 and '-', starting with a letter or digit,"
                " at most 63",
            )
        ],
    ),
    (
        "unknown key with suggestion",
        GOOD.replace('port = "/dev/ttyUSB0"', 'port = "/dev/ttyUSB0"\nbuad = 19200'),
        [("buses[0].buad", "unknown key (did you mean 'baud'?)")],
    ),
    (
        "unknown section",
        GOOD + "[uplnk]\nhost = 'x'\n",
        [("uplnk", "unknown key (did you mean 'uplink'?)")],
    ),
    (
        "wrong type: string for integer",
        GOOD.replace("slave = 1", 'slave = "1"'),
        [("devices[0].slave", "expected integer, got string '1'")],
    ),
    (
        "wrong type: integer for boolean",
        GOOD + "enabled = 1\n",
        [("devices[0].enabled", "expected boolean (true or false), got integer 1")],
    ),
    (
        "slave 0 is broadcast",
        GOOD.replace("slave = 1", "slave = 0"),
        [("devices[0].slave", "slave 0 is the broadcast address: devices need 1..247")],
    ),
    (
        "slave 255 on rtu",
        GOOD.replace("slave = 1", "slave = 255"),
        [("devices[0].slave", "slave 255 is allowed only on a tcp bus; use 1..247")],
    ),
    (
        "slave out of range",
        GOOD.replace("slave = 1", "slave = 300"),
        [("devices[0].slave", "value 300 out of range 1..247 (255 on tcp buses)")],
    ),
    (
        "same slave twice on a bus",
        GOOD + NOISE.replace("noise-1", "noise-2"),
        [
            (
                "devices[1].slave",
                "slave 1 on bus 'rs485-1' is already used by device 'noise-1' (devices[0])",
            )
        ],
    ),
    (
        "duplicate device name",
        GOOD + NOISE.replace("slave = 1", "slave = 2"),
        [("devices[1].name", "duplicate device name 'noise-1' (also devices[0])")],
    ),
    (
        "duplicate bus name",
        GATEWAY + RTU + RTU.replace("USB0", "USB1") + NOISE,
        [("buses[1].name", "duplicate bus name 'rs485-1' (also buses[0])")],
    ),
    (
        "device on a missing bus",
        GATEWAY + RTU + NOISE.replace('bus = "rs485-1"', 'bus = "rs485-2"'),
        [("devices[0].bus", "no bus named 'rs485-2' (did you mean 'rs485-1'?); buses: rs485-1")],
    ),
    (
        "unknown profile lists the available ones",
        GOOD.replace("sound_level_meter", "sound_meter"),
        [
            (
                "devices[0].profile",
                "unknown profile 'sound_meter' (did you mean 'sound_level_meter'?); available: "
                "gas_detector, gps_nmea, manhole_sensor, multi_sensor_air_box, pm_monitor, "
                "pms5003, pump_meter, radar_water_level, rain_gauge, sds011, sound_level_meter, "
                "weather_station",
            )
        ],
    ),
    (
        "rtu bus without port",
        GATEWAY + RTU.replace('port = "/dev/ttyUSB0"\n', "") + NOISE,
        [("buses[0].port", "missing required key")],
    ),
    (
        "tcp bus without host",
        GATEWAY + TCP.replace('host = "10.0.0.5"\n', ""),
        [("buses[0].host", "missing required key")],
    ),
    (
        "key of another bus kind",
        GATEWAY + TCP + "baud = 9600\n",
        [
            (
                "buses[0].baud",
                "'baud' does not apply to a 'tcp' bus (only to rtu, rtu-over-tcp and serial-sensor)",
            )
        ],
    ),
    (
        "serial key on rtu-over-tcp",
        GATEWAY + TCP.replace('"tcp"', '"rtu-over-tcp"') + 'parity = "N"\n',
        [("buses[0].parity", "'parity' does not apply to a 'rtu-over-tcp' bus (only to rtu)")],
    ),
    (
        "unknown bus kind",
        GATEWAY + RTU.replace('"rtu"', '"rtu-tcp"'),
        [
            (
                "buses[0].kind",
                "unknown bus kind 'rtu-tcp' (did you mean 'rtu-over-tcp'?); "
                "expected one of: rtu, tcp, rtu-over-tcp, serial-sensor",
            )
        ],
    ),
    (
        "baud out of range",
        GATEWAY + RTU + "baud = 600\n" + NOISE,
        [("buses[0].baud", "value 600 out of range 1200..921600")],
    ),
    (
        "parity not one of N E O",
        GATEWAY + RTU + 'parity = "even"\n' + NOISE,
        [("buses[0].parity", "unknown parity 'even'; expected one of: N, E, O")],
    ),
    (
        "stopbits not 1 or 2",
        GATEWAY + RTU + "stopbits = 3\n" + NOISE,
        [("buses[0].stopbits", "value 3 not allowed; expected 1 or 2")],
    ),
    (
        "timeout out of range",
        GATEWAY + RTU + "timeout_s = 0\n" + NOISE,
        [("buses[0].timeout_s", "value 0 out of range 0.01..30.0")],
    ),
    (
        "batch size out of range",
        GOOD + "[batch]\nmax_readings = 0\n",
        [("batch.max_readings", "value 0 out of range 1..10000")],
    ),
    (
        "spool durability typo",
        GOOD + '[spool]\ndurability = "ful"\n',
        [
            (
                "spool.durability",
                "unknown durability 'ful' (did you mean 'full'?); "
                "expected one of: full, normal, off",
            )
        ],
    ),
    (
        "spool too small",
        GOOD + "[spool]\nmax_bytes = 1000\n",
        [("spool.max_bytes", "value 1000 out of range 1048576..1099511627776")],
    ),
    (
        "log level typo",
        GOOD + '[log]\nlevel = "warn"\n',
        [
            (
                "log.level",
                "unknown level 'warn' (did you mean 'warning'?); "
                "expected one of: debug, info, warning, error",
            )
        ],
    ),
    (
        "uplink port out of range",
        GOOD + "[uplink]\nport = 70000\n",
        [("uplink.port", "value 70000 out of range 1..65535")],
    ),
    (
        "receipt timeout out of range",
        GOOD + "[uplink]\nconfirm_timeout_s = 0.5\nheartbeat_s = 7200\n",
        [
            ("uplink.confirm_timeout_s", "value 0.5 out of range 1.0..86400.0"),
            ("uplink.heartbeat_s", "value 7200 out of range 1.0..3600.0"),
        ],
    ),
    (
        "password without username",
        GOOD + '[uplink]\npassword = "x"\n',
        [("uplink.password", "a password needs a username")],
    ),
    (
        "topic prefix with wildcard",
        GOOD + '[uplink]\ntopic_prefix = "vitals/#"\n',
        [
            (
                "uplink.topic_prefix",
                "invalid value 'vitals/#': a topic without '+', '#', spaces, "
                "or a leading or trailing '/'",
            )
        ],
    ),
    (
        "tls cert without key",
        GOOD + '[uplink.tls]\ncert_file = "gw.crt"\n',
        [("uplink.tls.key_file", "cert_file and key_file go together: set both or neither")],
    ),
    (
        "a top-level key written under [gateway]",
        GATEWAY + 'devices = "noise-1"\n' + RTU,
        [("gateway.devices", "unknown key")],
    ),
    (
        "a key after [[buses]] belongs to that bus",
        GATEWAY + RTU + "slave = 3\n" + NOISE,
        [("buses[0].slave", "unknown key")],
    ),
    (
        "devices not an array of tables",
        'devices = "noise-1"\n' + GATEWAY + RTU,
        [("devices", "expected array of tables [[devices]], got string 'noise-1'")],
    ),
    (
        "missing profile dir",
        GATEWAY + 'profile_dirs = ["nowhere"]\n' + RTU + NOISE,
        [("gateway.profile_dirs[0]", "no such directory '{dir}/nowhere'")],
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_config_reports_precise_problem(
    tmp_path: Path, case: str, text: str, expected: list[tuple[str, str]]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    want = [(f"{path}: {key}", msg.format(dir=tmp_path)) for key, msg in expected]
    assert info.value.problems == want, case
    code, out = check(path)
    assert code == 1
    assert out.splitlines() == [f"{where}: {msg}" for where, msg in want]


def test_every_problem_of_the_file_at_once(tmp_path: Path) -> None:
    text = (
        GATEWAY.replace("gw-0001", "")
        + RTU
        + "baud = 600\n"
        + NOISE.replace("slave = 1", "slave = 0")
        + NOISE.replace("noise-1", "noise-2").replace("sound_level_meter", "nope")
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    keys = [where.removeprefix(f"{path}: ") for where, _ in info.value.problems]
    assert keys == ["gateway.id", "buses[0].baud", "devices[0].slave", "devices[1].profile"]


def test_broken_profile_of_a_device_is_reported_with_its_own_file(tmp_path: Path) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad_box.toml").write_text(
        '[profile]\nmodel = "B"\nvendor = "V"\n'
        '[[points]]\nname = "x"\nspace = "input"\naddress = 0\ntype = "f23"\n'
    )
    text = (
        GATEWAY
        + 'profile_dirs = ["profiles"]\n'
        + RTU
        + NOISE.replace("sound_level_meter", "bad_box")
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0] == (
        f"{path}: devices[0].profile",
        "profile 'bad_box' is invalid (its problems follow)",
    )
    where, msg = info.value.problems[1]
    assert where == f"{tmp_path / 'profiles' / 'bad_box.toml'}: points[0].type"
    assert msg.startswith("unknown type 'f23' (did you mean 'f32'?)")


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAY + "[[buses]]\nname = rs485\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [(f"{path}:4:8", "TOML syntax error: Invalid value")]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [(str(path), "no such file")]
    assert check(path) == (1, f"{path}: no such file")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    # chmod 0 does not stop root (CI runs as root): refuse the read instead
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [(str(path), "cannot read the file: permission denied")]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [(str(tmp_path), "is a directory, not a TOML file")]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(GOOD.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        (str(path), f"not UTF-8 text (bad byte at offset {len(GOOD) + 5})")
    ]


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert isinstance(config, Config)
    with pytest.raises(AttributeError):
        config.gateway.id = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.points[99] = config.points[0]  # type: ignore[index]


def test_a_device_on_a_missing_bus_names_every_declared_bus(tmp_path: Path) -> None:
    """A bus refused for its own problem is still named, marked, never '(none)'."""
    bad_bus = RTU.replace('port = "/dev/ttyUSB0"', 'port = "/dev/ttyUSB0"\nbaud = 12')
    lost = NOISE.replace('bus = "rs485-1"', 'bus = "rs485_1"')
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, GATEWAY + bad_bus + NOISE + lost.replace("noise-1", "n-2")))
    problems = dict((w.split(": ", 1)[1], m) for w, m in exc.value.problems)
    assert problems["buses[0].baud"] == "value 12 out of range 1200..921600"
    assert "devices[0].bus" not in problems  # its bus exists: its own problem is enough
    assert problems["devices[1].bus"] == (
        "no bus named 'rs485_1' (did you mean 'rs485-1'?); "
        "buses: rs485-1 (has a problem of its own)"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, GATEWAY + NOISE))
    assert exc.value.problems[-1][1].endswith("buses: (none: add a [[buses]] block)")


def test_check_json_lists_every_problem(tmp_path: Path) -> None:
    code, text = check(
        write(tmp_path, GATEWAY + RTU + NOISE.replace("slave = 1", "slave = 0")), as_json=True
    )
    assert code == 1
    doc = json.loads(text)
    assert doc["ok"] is False
    assert [p["where"].rsplit(": ", 1)[1] for p in doc["problems"]] == ["devices[0].slave"]
    code, text = check(write(tmp_path, GOOD), as_json=True)
    assert code == 0 and json.loads(text)["config"]["gateway"]["id"] == "gw-0001"


def test_configuration_md_documents_every_rule_key_and_links_only_real_files() -> None:
    import re

    from agent.ops.config import _ALL_RULE_KEYS, RULE_KINDS

    doc = (EXAMPLES.parent / "configuration.md").read_text()
    section = doc.split("## `[[rules]]`", 1)[1].split("\n## ", 1)[0]
    for key in ("id", "kind", "device", "point", *_ALL_RULE_KEYS):
        assert f"| `{key}` |" in section, f"[[rules]] key {key!r} is not in docs/configuration.md"
    for kind in RULE_KINDS:
        assert f"`{kind}`" in section
    for target in re.findall(r"\]\(([^)#]+)", doc):
        if "://" not in target:
            assert (EXAMPLES.parent / target).exists(), f"configuration.md links to {target}"
    assert "DESIGN.md" not in doc  # not in this repository


def test_receipt_timings_are_read(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, GOOD + "[uplink]\nconfirm_timeout_s = 5\nheartbeat_s = 2.5\n")
    )
    assert (cfg.uplink.confirm_timeout_s, cfg.uplink.heartbeat_s) == (5.0, 2.5)
    default = load_config(write(tmp_path, GOOD, "default.toml"))
    assert (default.uplink.confirm_timeout_s, default.uplink.heartbeat_s) == (60.0, 10.0)
