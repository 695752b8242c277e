"""``vitals diag trace``: the raw frames of an emulated RTU bus, each annotated.

The bus is :class:`simulator.rtu.RtuBus` on a real pty, its slave's faults
switched while the trace runs: a good reply, a CRC error (``crc``), a reply
after the master's timeout (``late``), random bytes (``garbage``), and an
adapter that hears its own transmission (``echo=True``). The live trace runs
as a real process in a tmux terminal; ``--json`` is parsed line by line.

Modbus TCP: :class:`simulator.tcp.TcpTerminal` on a real loopback socket, its
``fault`` and ``exception`` switched between traces, and a device slow to answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.profiles import load_profile
from simulator.rtu import RtuBus, RtuSlave
from simulator.tcp import TcpTerminal

VITALS = [sys.executable, "-c", "from agent.cli.diag import diag_app; diag_app()"]
BAUD = 19200
# the master's timeout and the slow device's delay: 0.15 s past the timeout, 0.25 s
# before the end of the late window (twice the timeout): margins a loaded machine keeps
TIMEOUT_S = 0.4
LATE_S = 0.55


@pytest.fixture
def slave() -> RtuSlave:
    s = RtuSlave(load_profile("sound_level_meter"), slave=2)
    s.delay_s = LATE_S  # 'late': after the timeout, within the late window
    return s


def _args(port: str, *more: str) -> list[str]:
    return [
        "trace",
        "--port",
        port,
        "--baud",
        str(BAUD),
        "--parity",
        "N",
        "--slave",
        "2",
        "--profile",
        "sound_level_meter",
        "--timeout",
        str(TIMEOUT_S),
        "--interval",
        "0.3",
        *more,
    ]


def _json_trace(port: str, samples: int = 2) -> list[dict[str, Any]]:
    r = subprocess.run(
        [*VITALS, *_args(port, "--json", "--samples", str(samples))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_json_frames_of_good_crc_late_and_garbage_replies(slave: RtuSlave) -> None:
    with RtuBus([slave], baud=BAUD) as bus:
        good = _json_trace(bus.port, samples=1)
        slave.fault = "crc"
        crc = _json_trace(bus.port, samples=1)
        slave.fault = "late"
        late = _json_trace(bus.port, samples=1)
        slave.fault = "garbage"
        garbage = _json_trace(bus.port, samples=1)
    # a good poll: each request, then its reply, numbered alike, CRC good
    assert [(f["dir"], f["kind"], f["request"]) for f in good] == [
        ("tx", "request", 1),
        ("rx", "reply", 1),
        ("tx", "request", 2),
        ("rx", "reply", 2),
    ]
    for f in good:
        assert f["slave"] == 2 and f["crc_ok"] is True
        assert f["function"] in (3, 4)
        assert bytes.fromhex(f["hex"])[:2] == bytes([2, f["function"]])
    assert "reply to #1 in" in good[1]["note"]
    # the CRC error: the reply's frame, its CRC bad, tied to its request
    assert [(f["kind"], f["request"], f["crc_ok"]) for f in crc if f["dir"] == "rx"] == [
        ("crc-error", 1, False),
        ("crc-error", 2, False),
    ]
    assert "bad CRC" in crc[1]["note"]
    # the late reply: after the request's timeout; diag stops asking after no answer
    assert [(f["dir"], f["kind"], f["request"]) for f in late] == [
        ("tx", "request", 1),
        ("rx", "late", 1),
    ]
    assert "after its timeout" in late[1]["note"]
    assert late[1]["t"] - late[0]["t"] > TIMEOUT_S
    # random bytes: garbage, answering nothing
    kinds = [f["kind"] for f in garbage if f["dir"] == "rx"]
    assert kinds and set(kinds) == {"garbage"}
    assert all(f["request"] is None for f in garbage if f["dir"] == "rx")


def test_an_adapter_echo_is_told_from_the_reply(slave: RtuSlave) -> None:
    with RtuBus([slave], baud=BAUD, echo=True) as bus:
        frames = _json_trace(bus.port, samples=1)
    assert [(f["dir"], f["kind"], f["request"]) for f in frames] == [
        ("tx", "request", 1),
        ("rx", "echo", 1),
        ("rx", "reply", 1),
        ("tx", "request", 2),
        ("rx", "echo", 2),
        ("rx", "reply", 2),
    ]
    assert frames[1]["hex"] == frames[0]["hex"]


# -- live, in a real terminal ---------------------------------------------------------


def _tmux(sock: str, *args: str) -> str:
    return subprocess.run(
        ["tmux", "-L", sock, *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package)")
def test_live_trace_annotates_a_crc_error_and_a_late_reply(slave: RtuSlave, tmp_path: Path) -> None:
    sock = f"vitals-trace-{uuid.uuid4().hex[:8]}"
    with RtuBus([slave], baud=BAUD) as bus:
        cmd = " ".join(
            [*(f"'{a}'" for a in VITALS), *_args(bus.port), f"; echo EXIT=$? > {tmp_path / 'rc'}"]
        )
        env = {"TERM": "xterm-256color", "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
        tmux = ["tmux", "-f", "/dev/null", "-L", sock, "new-session", "-d"]
        subprocess.run(
            [*tmux, "-x", "160", "-y", "50", "-c", os.getcwd(), cmd],
            check=True,
            timeout=10,
            env=env,
        )
        try:

            def wait_for(text: str) -> str:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    screen = _tmux(sock, "capture-pane", "-p", "-J", "-S", "-200", "-t", "0")
                    if text in screen:
                        return screen
                    time.sleep(0.1)
                pytest.fail(f"not on the screen within 30 s: {text!r}\n{screen}")

            wait_for("reply #2")
            slave.fault = "crc"
            wait_for("crc-error #")
            slave.fault = "late"
            screen = wait_for("late #")
            _tmux(sock, "send-keys", "-t", "0", "C-c")
            deadline = time.monotonic() + 10
            while not (tmp_path / "rc").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            subprocess.run(["tmux", "-L", sock, "kill-server"], timeout=10, check=False)
    assert f"trace {bus.port} 19200 8N1" in screen
    lines = screen.splitlines()
    reply = next(line for line in lines if "reply #1 " in line)
    assert "slave 2 fn 3: reply to #1 in" in reply and "02 03 0e" in reply
    crc = next(line for line in lines if "crc-error #" in line)
    assert "bad CRC, reply to #" in crc and "refused" in crc
    late = next(line for line in lines if "late #" in line)
    assert "after its timeout" in late
    # the late reply answers the request printed just before it
    n = late.split("late #")[1].split()[0]
    before = lines[lines.index(late) - 1]
    assert f"request #{n} " in before
    assert (tmp_path / "rc").read_text().strip() == "EXIT=0"


# -- tapping the running agent --------------------------------------------------------


async def test_tap_the_running_agents_bus(slave: RtuSlave, tmp_path: Path) -> None:
    from agent.ops.config import parse_config
    from agent.ops.state import create_identity
    from agent.service import Agent
    from simulator.broker import free_port

    with RtuBus([slave], baud=BAUD) as bus:
        cfg = parse_config(
            {
                "gateway": {"id": "gw-tap", "state_dir": str(tmp_path / "gw")},
                "uplink": {"host": "127.0.0.1", "port": free_port()},  # no broker there
                "buses": [
                    {"name": "rs485", "kind": "rtu", "port": bus.port, "baud": BAUD}
                    | {"parity": "N", "timeout_s": TIMEOUT_S}
                ],
                "devices": [
                    {"name": "noise", "bus": "rs485", "profile": "sound_level_meter"}
                    | {"slave": 2, "interval_s": 0.2}
                ],
            },
            source="<tap test>",
            base=tmp_path,
        )
        agent = Agent(cfg, identity=create_identity(cfg.gateway.state_dir), drain_timeout_s=0.5)
        stop = asyncio.Event()
        run = asyncio.create_task(agent.run(stop))
        sock = cfg.gateway.state_dir / "trace.sock"

        async def tap(*more: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                *VITALS,
                "trace",
                "--socket",
                str(sock),
                "--json",
                *more,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, out.decode(), err.decode()

        try:
            await asyncio.wait_for(agent.ready.wait(), 10)
            for _ in range(100):  # the socket is bound by a task the agent has started
                if sock.exists():
                    break
                await asyncio.sleep(0.05)
            assert oct(sock.stat().st_mode & 0o777) == "0o660"  # the service group only
            rc, out, err = await tap("--bus", "rs485", "--frames", "4")
            assert rc == 0, err
            good = [json.loads(line) for line in out.splitlines()]
            slave.fault = "crc"
            rc, out, err = await tap("--bus", "rs485", "--frames", "6")
            assert rc == 0, err
            crc = [json.loads(line) for line in out.splitlines()]
            rc, out, err = await tap("--bus", "nope")
            assert rc == 2 and "no Modbus bus named 'nope'" in out and "rs485" in out
            polls = agent.pollers[0].devices[0].polls
        finally:
            stop.set()
            await asyncio.wait_for(run, 30)
    # the agent's own requests and replies, tied together (the tap may begin mid-exchange)
    first = next(i for i, f in enumerate(good) if f["kind"] == "request")
    req, reply = good[first], good[first + 1]
    assert (req["kind"], reply["kind"]) == ("request", "reply")
    assert reply["request"] == req["request"] and reply["crc_ok"] is True
    assert all(f["slave"] == 2 for f in good if f["kind"] in ("request", "reply"))
    assert "crc-error" in {f["kind"] for f in crc}
    assert all(f["crc_ok"] is False for f in crc if f["kind"] == "crc-error")
    assert polls >= 3  # it polled on while traced
    assert agent.pollers[0].link.trace is None  # the hook is gone with the client


# -- Modbus TCP: MBAP frames, against the emulated TCP terminal -----------------------


class _SlowTerminal(TcpTerminal):
    """A terminal whose device takes ``delay_s`` to answer (0: at once).

    It serves from its own thread's event loop, so the wait is the device's only.
    """

    delay_s = 0.0

    def handle(self, unit: int, pdu: bytes) -> bytes | None:
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().handle(unit, pdu)


@pytest.fixture
def terminal() -> Iterator[_SlowTerminal]:
    loop = asyncio.new_event_loop()
    term = _SlowTerminal(load_profile("sound_level_meter"), slave=3)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(term.start(), loop).result(10)
    try:
        yield term
    finally:
        asyncio.run_coroutine_threadsafe(term.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _tcp_trace(term: TcpTerminal, samples: int = 1) -> list[dict[str, Any]]:
    args = ["trace", "--host", "127.0.0.1", "--tcp-port", str(term.port), "--slave", "3"]
    # the next request a second after the last: a late reply (LATE_S) is read before it
    args += ["--profile", "sound_level_meter", "--timeout", str(TIMEOUT_S), "--interval", "1.0"]
    r = subprocess.run(
        [*VITALS, *args, "--json", "--samples", str(samples)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def _tid(f: dict[str, Any]) -> int:
    return int.from_bytes(bytes.fromhex(f["hex"])[:2], "big")


def test_modbus_tcp_frames_cut_by_mbap_and_matched_by_transaction_id(
    terminal: _SlowTerminal,
) -> None:
    good = _tcp_trace(terminal)
    terminal.exception = 2
    exception = _tcp_trace(terminal)
    terminal.exception = None
    terminal.fault = "trailing"
    trailing = _tcp_trace(terminal)
    terminal.fault = "tid"
    tid = _tcp_trace(terminal)
    terminal.fault = "garbage"
    garbage = _tcp_trace(terminal)
    terminal.fault = None
    terminal.delay_s = LATE_S  # after the timeout
    late = _tcp_trace(terminal, samples=2)
    # a good poll: each request, then its reply, tied by the transaction id
    assert [(f["dir"], f["kind"], f["request"]) for f in good] == [
        ("tx", "request", 1),
        ("rx", "reply", 1),
        ("tx", "request", 2),
        ("rx", "reply", 2),
    ]
    for req, reply in (good[0:2], good[2:4]):
        assert _tid(req) == _tid(reply)
        assert f"tid {_tid(req)} unit 3 fn" in req["note"]
        assert req["slave"] == reply["slave"] == 3 and req["function"] == reply["function"]
        assert req["crc_ok"] is None  # no CRC in Modbus TCP
    assert "reply to #1 in" in good[1]["note"] and " ms" in good[1]["note"]
    # the device refuses: an exception, its code, to its request
    assert [(f["kind"], f["request"]) for f in exception if f["dir"] == "rx"] == [
        ("exception", 1),
        ("exception", 2),
    ]
    assert "exception 2 to #1" in exception[1]["note"] and exception[1]["function"] == 0x83
    # bytes after the reply: the reply, then garbage that is not Modbus TCP
    assert [(f["dir"], f["kind"]) for f in trailing][:3] == [
        ("tx", "request"),
        ("rx", "reply"),
        ("rx", "garbage"),
    ]
    assert bytes.fromhex(trailing[2]["hex"]) == b"\r\nERROR 42\r\n"
    assert "not Modbus TCP" in trailing[2]["note"]
    # a transaction id on no request out: garbage, answering nothing
    rx = [f for f in tid if f["dir"] == "rx"]
    assert rx and {f["kind"] for f in rx} == {"garbage"}
    assert f"transaction id {_tid(tid[0]) + 1}, on no request out" in rx[0]["note"]
    assert all(f["request"] is None for f in rx)
    # random bytes: garbage
    rx = [f for f in garbage if f["dir"] == "rx"]
    assert rx and {f["kind"] for f in rx} == {"garbage"}
    # the slow device: #1 times out, its reply is late; read before request #2 goes out
    assert [(f["dir"], f["kind"], f["request"]) for f in late][:3] == [
        ("tx", "request", 1),
        ("rx", "late", 1),
        ("tx", "request", 2),
    ]
    assert _tid(late[1]) == _tid(late[0]) and "after its timeout" in late[1]["note"]


async def test_tap_the_running_agents_modbus_tcp_bus(
    terminal: _SlowTerminal, tmp_path: Path
) -> None:
    """``--bus`` on a Modbus TCP bus: the agent's own MBAP frames, tied by transaction id;
    a slow device's replies come after their timeout and are named late."""
    from agent.ops.config import parse_config
    from agent.ops.state import create_identity
    from agent.service import Agent
    from simulator.broker import free_port

    cfg = parse_config(
        {
            "gateway": {"id": "gw-tap-tcp", "state_dir": str(tmp_path / "gw")},
            "uplink": {"host": "127.0.0.1", "port": free_port()},  # no broker there
            "buses": [
                {"name": "tcp-1", "kind": "tcp", "host": "127.0.0.1"}
                | {"tcp_port": terminal.port, "timeout_s": TIMEOUT_S}
            ],
            "devices": [
                {"name": "noise", "bus": "tcp-1", "profile": "sound_level_meter"}
                | {"slave": 3, "interval_s": 0.2}
            ],
        },
        source="<tap test>",
        base=tmp_path,
    )
    agent = Agent(cfg, identity=create_identity(cfg.gateway.state_dir), drain_timeout_s=0.5)
    stop = asyncio.Event()
    run = asyncio.create_task(agent.run(stop))
    sock = cfg.gateway.state_dir / "trace.sock"

    async def tap(*more: str) -> list[dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            *VITALS,
            *("trace", "--socket", str(sock), "--json", "--bus", "tcp-1", *more),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return [json.loads(line) for line in out.decode().splitlines()]

    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
        for _ in range(100):  # the socket is bound by a task the agent has started
            if sock.exists():
                break
            await asyncio.sleep(0.05)
        good = await tap("--frames", "6")
        terminal.delay_s = LATE_S  # after the bus's timeout
        late = await tap("--frames", "12")
        terminal.delay_s = 0.0
        polls = agent.pollers[0].devices[0].polls
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
    # the agent's requests and their replies, tied by transaction id (the tap may begin
    # mid-exchange: a reply to a request sent before it is no garbage)
    assert "garbage" not in {f["kind"] for f in good}
    first = next(i for i, f in enumerate(good) if f["kind"] == "request")
    req, reply = good[first], good[first + 1]
    assert (req["kind"], reply["kind"]) == ("request", "reply")
    assert reply["request"] == req["request"] and _tid(reply) == _tid(req)
    assert f"tid {_tid(req)} unit 3 fn" in req["note"] and req["crc_ok"] is None
    assert "reply to #" in reply["note"] and " ms" in reply["note"]
    # the slow device: a reply whose transaction id timed out is late, tied to its request
    assert "garbage" not in {f["kind"] for f in late}
    sent = {f["request"]: f for f in late if f["kind"] == "request"}
    lates = [f for f in late if f["kind"] == "late" and f["request"] is not None]
    assert lates, [(f["dir"], f["kind"]) for f in late]
    for f in lates:
        assert "after its timeout" in f["note"]
        assert _tid(sent[f["request"]]) == _tid(f)
    # a reply to a request sent before the tap began: named so (late once a request
    # of the trace went out before it)
    for i, f in enumerate(late):
        if f["dir"] == "rx" and f["request"] is None:
            assert "sent before the trace" in f["note"]
            after_request = any(g["kind"] == "request" for g in late[:i])
            assert f["kind"] == ("late" if after_request else "reply")
    assert polls >= 3  # it polled on while traced
    assert agent.pollers[0].link.trace is None  # the hook is gone with the client
