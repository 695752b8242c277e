"""``vitals diag probe``: names the order a value was stored in."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agent.cli.diag import diag_app
from agent.cli.diag.probe import probe
from protocols.modbus import DataType, Order, PointSpec, Space, encode

runner = CliRunner()

# (type, value stored, --expect range): each stored in all four orders below
CASES = [
    (DataType.F32, 123.456, (100.0, 150.0)),
    (DataType.F32, -12.5, (-20.0, 0.0)),
    (DataType.F32, 0.0123, (0.001, 0.1)),
    (DataType.F32, 101325.0, (90000.0, 110000.0)),
    (DataType.U32, 123456, (100000.0, 200000.0)),
    (DataType.U32, 3_000_000_000, (2.9e9, 3.1e9)),
    (DataType.U32, 70000, (65536.0, 100000.0)),
    (DataType.I32, -123456, (-200000.0, -100000.0)),
    (DataType.F64, 273.15, (200.0, 300.0)),
    (DataType.U64, 12_345_678_901, (1e10, 2e10)),
]
ORDERS = [Order.ABCD, Order.CDAB, Order.BADC, Order.DCBA]


def _words(dtype: DataType, order: Order, value: float) -> list[int]:
    spec = PointSpec(name="x", space=Space.HOLDING, address=0, type=dtype, order=order)
    return encode(spec, value)


@pytest.mark.parametrize("order", ORDERS, ids=str)
@pytest.mark.parametrize(("dtype", "value", "expect"), CASES, ids=lambda c: str(c))
def test_names_the_order_the_value_was_stored_in(
    dtype: DataType, value: float, expect: tuple[float, float], order: Order
) -> None:
    words = _words(dtype, order, value)
    result = probe(words, expect)
    assert result.verdict is order
    assert dtype in {c.type for c in result.plausible}
    hit = next(c for c in result.plausible if c.type is dtype)
    assert hit.value == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("order", ORDERS, ids=str)
def test_cli_json_names_the_order(order: Order) -> None:
    words = _words(DataType.F32, order, 123.456)
    arg = ",".join(f"0x{w:04X}" for w in words)
    r = runner.invoke(diag_app, ["probe", "--words", arg, "--expect", "100..150", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["order"] == str(order)
    assert out["types"] == ["f32"]
    assert len(out["candidates"]) == 12


def test_cli_table_marks_the_plausible_value_and_names_the_order() -> None:
    r = runner.invoke(diag_app, ["probe", "--words", "0xE979,0x42F6", "--expect", "100..150"])
    assert r.exit_code == 0, r.output
    assert "123.456 ✓" in r.output
    assert 'order = "CDAB"' in r.output


def test_nothing_plausible_exits_1_with_advice() -> None:
    r = runner.invoke(diag_app, ["probe", "--words", "0x42F6,0xE979", "--expect", "1..2"])
    assert r.exit_code == 1
    assert "no order gives a value in 1..2" in r.output


def test_symmetric_words_are_ambiguous() -> None:
    # 0x0001 0x0001 reads 65537 in ABCD and CDAB alike: probe must not pick one
    result = probe([1, 1], (65537.0, 65537.0))
    assert result.orders == [Order.ABCD, Order.CDAB]
    assert result.verdict is None


def test_without_expect_only_the_table() -> None:
    r = runner.invoke(diag_app, ["probe", "--words", "0x42F6,0xE979"])
    assert r.exit_code == 0
    assert "pass --expect" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--words", "0x42F6"], "1 words given"),
        (["--words", "0x42F6,zz"], "'zz' is not a number"),
        (["--words", "0x42F6,0x10000"], "65536 is not a 16-bit register value"),
        (["--words", "1,2", "--expect", "5"], "'5' is not a range"),
        ([], "nothing to probe"),
        (["--words", "1,2", "--port", "/dev/null"], "--words and --port/--host: which one?"),
        (["--port", "/dev/null", "--host", "h"], "which one?"),
        (["--port", "/dev/null", "--baud", "0"], "--baud 0"),
        (["--port", "/dev/null", "--slave", "300"], "--slave 300"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(args: list[str], message: str) -> None:
    r = runner.invoke(diag_app, ["probe", *args])
    assert r.exit_code == 2
    assert message in r.output
    assert "Traceback" not in r.output
