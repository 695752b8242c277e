"""The agent: buses, batcher, spool and uplink in one TaskGroup.

``Agent(config).run(stop)`` runs until ``stop`` is set, then stops in order:
the buses stop polling, the open batch is sealed and spooled, the uplink
publishes what the spool holds, and everything closes, all within
``drain_timeout_s`` (10 s) of ``stop`` whatever the broker and the terminals are
doing: the uplink publishes until :data:`CLOSE_RESERVE_S` before that bound,
and a task that does not end when cancelled is cancelled again. What the
broker has not acknowledged by then stays in the spool for the next start:
nothing is lost on a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from agent.clock import Clock, SystemClock
from agent.edge.commands import CommandExecutor, agent_handlers
from agent.edge.rules import EdgeEvents
from agent.fieldbus.engine import TcpEngine
from agent.fieldbus.links import ModbusLink
from agent.fieldbus.poller import BusPoller, PolledDevice
from agent.ops.config import SENSOR_BUS, BusConfig, Config
from agent.ops.confpush import ConfigReceiver, ConfigStore
from agent.ops.state import Identity, load_hub_key, load_identity, next_epoch
from agent.ops.status import StatusWriter, summary
from agent.ops.systemd import SdNotifier
from agent.ops.tap import serve_tap, tap_socket_path
from agent.ops.tls import tls_context
from agent.pipeline.batcher import Batcher
from agent.pipeline.spool import Row, Spool, SpoolRow
from agent.pipeline.uplink import GapSigner, HeartbeatSigner, Uplink
from drivers.collector import steady_gc
from protocols import envelope
from protocols.gap import GapRange, seal_gap
from protocols.payload import PointInfo
from protocols.receipt import HeldRange, seal_heartbeat

if TYPE_CHECKING:  # imported when a serial-sensor bus or a firmware push needs them
    from agent.fieldbus.sensors import SensorReader
    from agent.ops.fwupdate import FirmwareCommands

__all__ = ["CLOSE_RESERVE_S", "Agent", "link_for"]

log = logging.getLogger(__name__)

#: of the stop's bound, the time kept for closing after the drain: the MQTT
#: connections' goodbye (at most 1 s each, at once) and the spool's close
CLOSE_RESERVE_S = 2.0
#: at a stop, once every batch is sent (the broker's PUBACK), how long the drain
#: still waits for the hub's receipts (a hub answers within about a second); what
#: it has not confirmed by then stays in the spool and goes again at the next start
RECEIPT_GRACE_S = 2.0


async def _end(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again any that go on: a task
    cancelled just as a child fails can lose the cancellation (a TaskGroup in Python
    3.11 raises the child's error instead), and a stop must end all the same."""
    pending = {t for t in tasks if not t.done()}
    warned = False
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
        if pending and not warned:
            warned = True
            log.warning(
                "stopping: %s still running 1 s after being cancelled, cancelling again",
                ", ".join(sorted(t.get_name() for t in pending)),
            )


def link_for(bus: BusConfig) -> ModbusLink:
    """The Modbus link a bus of the configuration describes."""
    if bus.kind == "tcp":
        return ModbusLink.tcp(bus.host, bus.tcp_port, timeout_s=bus.timeout_s)
    if bus.kind == "rtu-over-tcp":
        return ModbusLink.tcp(
            bus.host,
            bus.tcp_port,
            timeout_s=bus.timeout_s,
            rtu_framing=True,
            baud=bus.baud,
            inter_frame_s=bus.frame_gap_s,
        )
    return ModbusLink.serial(
        bus.port,
        baud=bus.baud,
        parity=bus.parity,
        stopbits=bus.stopbits,
        bytesize=bus.bytesize,
        timeout_s=bus.timeout_s,
        inter_frame_s=bus.frame_gap_s,
        discard_echo=bus.discard_echo,
    )


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        identity: Identity | None = None,
        links: Mapping[str, ModbusLink] | None = None,
        drain_timeout_s: float = 10.0,
        uplink_overrides: Mapping[str, Any] | None = None,
        spool_max_pages: int | None = None,
        notifier: SdNotifier | None = None,
        reload: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._identity = identity
        self._links = dict(links or {})
        self.drain_timeout_s = drain_timeout_s
        self._uplink_overrides = dict(uplink_overrides or {})
        self._spool_max_pages = spool_max_pages
        self.started = time.time()
        self.epoch = 0
        self.spool: Spool | None = None
        self.batcher: Batcher | None = None
        self.uplink: Uplink | None = None
        self.pollers: list[BusPoller] = []
        self.sensors: list[SensorReader] = []  # serial-sensor buses: nothing to poll
        self.ready = asyncio.Event()
        self.notifier = notifier or SdNotifier(None)
        self._reload = reload  # asks whoever runs the agent to reload (the "reload" command)
        self.commands: CommandExecutor | None = None
        self.events: EdgeEvents | None = None
        self.confpush: ConfigReceiver | None = None
        self.firmware: FirmwareCommands | None = None

    @property
    def buses(self) -> list[BusPoller | SensorReader]:
        """Every bus task: Modbus pollers and serial-sensor readers."""
        return [*self.pollers, *self.sensors]

    def _meta(self, identity: Identity, epoch: int) -> bytes:
        points = [
            PointInfo(
                id=pid,
                device=dev.name,
                name=p.spec.name,
                unit=p.unit,
                domain=p.domain,
                cls=p.cls,
                indicator=p.indicator,
            )
            for pid, (dev, p) in sorted(self.config.points.items())
        ]
        return envelope.seal_meta(
            points, gateway=self.config.gateway.id, key=identity.private_key, epoch=epoch
        )

    def _gap_signer(self, identity: Identity, epoch: int) -> GapSigner:
        gateway, key = self.config.gateway.id, identity.private_key

        def sign(ranges: Sequence[GapRange]) -> bytes:
            return seal_gap(ranges, gateway=gateway, key=key, epoch=epoch)

        return sign

    def _heartbeat_signer(self, identity: Identity, epoch: int) -> HeartbeatSigner:
        gateway, key = self.config.gateway.id, identity.private_key

        def sign(held: Sequence[tuple[int, int, int]]) -> bytes:
            assert self.batcher is not None
            return seal_heartbeat(
                key,
                gateway,
                epoch=epoch,
                sealed=self.batcher.next_seq - 1,
                held=[HeldRange(*h) for h in held],
                t_ms=int(time.time() * 1000),
            )

        return sign

    def _split(self, row: SpoolRow) -> list[Row]:
        """A spooled batch's readings re-sealed as two batches with new seqs."""
        assert self.batcher is not None
        batch = envelope.parse(row.data)
        parts = self.batcher.reseal(
            batch.readings(), unsynced=batch.header.unsynced, split_of=(row.epoch, row.seq)
        )
        return [(p.epoch, p.seq, p.n, p.t0, p.data) for p in parts]

    def _sealed(self) -> tuple[int, int]:
        assert self.batcher is not None
        return self.epoch, self.batcher.next_seq - 1

    async def _setup(self) -> None:
        cfg = self.config
        state = cfg.gateway.state_dir
        identity = self._identity
        if identity is None:
            identity = await asyncio.to_thread(load_identity, state)
        self.epoch = await asyncio.to_thread(next_epoch, state)
        # the epoch is durable before the batcher exists: no (epoch, seq) is ever reused
        self.spool = await Spool.open(
            state / "spool.sqlite3",
            durability=cfg.spool.durability,
            max_bytes=cfg.spool.max_bytes,
            max_age_s=cfg.spool.max_age_h * 3600.0,
            max_page_count=self._spool_max_pages,
        )
        if cfg.rules:
            self.events = EdgeEvents(
                cfg.rules,
                gateway=cfg.gateway.id,
                key=identity.private_key,
                epoch=self.epoch,
                clock=self.clock,
            )
        # the buses' sink: the edge rules look at each reading, then the batcher takes it
        self.batcher = Batcher(
            gateway=cfg.gateway.id,
            key=identity.private_key,
            epoch=self.epoch,
            max_readings=cfg.batch.max_readings,
            max_age_s=cfg.batch.max_age_s,
            encoding=cfg.batch.encoding,
            clock=self.clock,
            observe=self.events.observe if self.events is not None else None,
        )
        self._tls = tls_context(cfg.uplink.tls)
        hub_key = await asyncio.to_thread(load_hub_key, state)
        settings = replace(cfg.uplink, **self._uplink_overrides)  # tests: quicker timings
        self.uplink = Uplink(
            settings,
            self.spool,
            tls=self._tls,
            meta=self._meta(identity, self.epoch),
            gap_signer=self._gap_signer(identity, self.epoch),
            hub_key=hub_key,
            heartbeat=self._heartbeat_signer(identity, self.epoch),
            splitter=self._split,
            sealed=self._sealed,
        )
        if self.events is not None:  # its outbox on disk; its receipts via the uplink
            await self.events.load(self.spool)
            self.events.receipts = self.uplink.receipts_on
            self.events.confirm_timeout_s = settings.confirm_timeout_s
            self.uplink.on_event_receipt = self.events.confirm
        if hub_key is None:
            log.warning(
                "no hub key (hub.pub in the state directory): a batch leaves the spool on "
                "the broker's PUBACK, not on the hub's receipt (a broker that drops it "
                "loses it); hint: enroll with `vitals provision` to get hub receipts"
            )
        for bus in cfg.buses:
            devices = [
                PolledDevice(
                    name=d.name,
                    slave=d.slave,
                    interval_s=d.interval_s,
                    max_registers=d.profile.max_registers,
                    max_gap=d.profile.max_gap,
                    points=cfg.points.of(d),
                )
                for d in cfg.devices
                if d.bus == bus.name and d.enabled
            ]
            if not devices:
                continue
            if bus.kind == SENSOR_BUS:
                from agent.fieldbus.sensors import SensorReader

                (dev,) = devices  # the config allows one sensor per serial-sensor bus
                protocol = cfg.device(dev.name).profile.protocol
                self.sensors.append(
                    SensorReader(
                        bus.name,
                        port=bus.port,
                        baud=bus.baud,
                        timeout_s=bus.timeout_s,
                        protocol=protocol,
                        device=dev,
                        sink=self.batcher.add,
                        clock=self.clock,
                    )
                )
                continue
            link = self._links.get(bus.name) or link_for(bus)
            self.pollers.append(
                BusPoller(
                    bus.name,
                    link,
                    devices,
                    self.batcher.add,
                    self.clock,
                    retries=bus.retries,
                    inter_frame_s=bus.frame_gap_s,
                )
            )
        self.commands = CommandExecutor(
            cfg.gateway.id,
            hub_key,
            identity.private_key,
            {
                **agent_handlers(
                    cfg,
                    {p.name: p.link for p in self.pollers},
                    reload=self._request_reload if self._reload is not None else None,
                ),
                "resend": self.uplink.resend,
                # a firmware image the hub pushes, sent in the idle time of the bus
                "firmware": self._firmware,
            },
            seen_path=state / "commands.seen",
        )
        self.uplink.commands = self.commands
        self.confpush = ConfigReceiver(
            gateway=cfg.gateway.id,
            hub_key=hub_key,
            key=identity.private_key,
            store=await asyncio.to_thread(ConfigStore.of, state),
            config=cfg,
            stats=self.statistics,
            reload=self._reload,
            prefix=cfg.uplink.topic_prefix,
        )
        self.uplink.confpush = self.confpush  # pushed configurations, on its connection
        log.info(
            "agent %s epoch %d: %d buses, %d devices, %d points, kid %s",
            cfg.gateway.id,
            self.epoch,
            len(self.pollers) + len(self.sensors),
            sum(len(p.devices) for p in self.buses),
            len(cfg.points),
            identity.kid.hex(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self._setup()
        steady = contextlib.ExitStack()  # the collector once started (drivers.collector)
        assert self.batcher is not None and self.spool is not None and self.uplink is not None
        try:
            async with asyncio.TaskGroup() as tg:
                # Modbus TCP buses that need no gap between transactions: one task for all
                by_engine = [p for p in self.pollers if p.link.callbacks]
                pollers = [
                    tg.create_task(p.run(), name=f"bus[{p.name}].poll")
                    for p in self.pollers
                    if not p.link.callbacks
                ] + [tg.create_task(s.run(), name=f"bus[{s.name}].sensor") for s in self.sensors]
                engine = None
                if by_engine:
                    engine = TcpEngine(by_engine, self.batcher.add, self.clock)
                    pollers.append(tg.create_task(engine.run(), name="bus[tcp].engine"))
                aging = tg.create_task(self.batcher.run(), name="batch.age")
                writer = tg.create_task(self.spool.keep(self.batcher.sealed), name="spool.write")
                acks = tg.create_task(self.spool.run_acks(), name="spool.ack")
                uplink = tg.create_task(self.uplink.run(), name="uplink.mqtt")
                ticks = events_out = None
                if self.events is not None:
                    ticks = tg.create_task(self.events.run_ticks(), name="rules.tick")
                    publish = self.events.publish(self.config.uplink, self._tls)
                    events_out = tg.create_task(publish, name="events.publish")
                status = tg.create_task(
                    StatusWriter(self, on_write=self._notify_status).run(),
                    name="status.write",
                )
                extras = []
                if self.confpush is not None:  # a pushed version on trial: keep or roll back
                    extras.append(tg.create_task(self.confpush.run_trial(), name="config.trial"))
                if self.config.metrics.listen:  # prometheus-client imported only then
                    from agent.ops.metrics import serve_metrics

                    m = self.config.metrics
                    serve = serve_metrics(self, m.host, m.port)
                    extras.append(tg.create_task(serve, name="metrics.http"))
                links = {p.name: p.link for p in self.pollers}
                if links:  # `vitals diag trace --bus NAME` taps these links (RTU and TCP)
                    tap = serve_tap(links, tap_socket_path(self.config.gateway.state_dir))
                    extras.append(tg.create_task(tap, name="trace.tap"))
                self.ready.set()
                self.notifier.ready(f"gateway {self.config.gateway.id}")
                # start-up objects (configuration, point table, pollers) live as long as
                # the agent: stop the collector rescanning them (1.2 % of a core at
                # 15,000 readings/s, collecting nothing)
                steady.enter_context(steady_gc())
                await stop.wait()
                loop = asyncio.get_running_loop()
                drain_until = loop.time() + max(0.0, self.drain_timeout_s - CLOSE_RESERVE_S)
                log.info("stopping: sealing the open batch and draining the spool")
                if engine is not None:  # the polls on the wire end and are kept
                    wire = 2 * max(p.link.timeout_s for p in by_engine)
                    await engine.finish(min(wire, max(0.0, drain_until - loop.time())))
                await _end([*pollers, aging, *([ticks] if ticks else [])])
                await self.batcher.close()  # the writer spools what is left, then ends
                await writer
                # tell the hub the last seq sealed: it answers with a receipt for the tail
                await self.uplink.heartbeat()
                await self._drain(drain_until)
                await _end([uplink, *([events_out] if events_out else []), acks, status, *extras])
        finally:
            left = self.spool.statistics()["depth_batches"]
            if left:
                log.warning("%d batches stay in the spool for the next start", left)
            b = self.batcher
            log.info(
                "stopped: epoch %d, %d readings polled, %d batches sealed, %d left in the spool",
                self.epoch,
                b.readings_in,
                b.batches_sealed,
                left,
            )
            steady.close()  # a reload starts a new agent: let this one's objects go
            await self.spool.close()

    async def _drain(self, until: float) -> None:
        """Wait until the spool is empty (every batch confirmed) or ``until`` (loop
        time); once every batch is sent, receipts get :data:`RECEIPT_GRACE_S` more, so
        a hub that is away does not hold every stop and reload for the whole bound.
        It wakes when the spool tells it what waits changed (:attr:`Spool.progress`)
        or at one of those bounds: no polling."""
        assert self.spool is not None
        loop, spool = asyncio.get_running_loop(), self.spool
        all_sent_at: float | None = None
        while not spool.empty.is_set() and (now := loop.time()) < until:
            if spool.unsent:
                all_sent_at = None  # some still wait for their PUBACK
            elif all_sent_at is None:
                all_sent_at = now
            elif now - all_sent_at >= RECEIPT_GRACE_S:
                log.info(
                    "stopping: %d sent batches without the hub's receipt yet; they go "
                    "again at the next start (the hub drops what it already has)",
                    spool.statistics()["sent_unconfirmed"],
                )
                return
            wake = until if all_sent_at is None else min(until, all_sent_at + RECEIPT_GRACE_S)
            try:
                async with asyncio.timeout_at(wake):
                    if not await spool.progress.wait():
                        return  # closed: the spool tells nothing more
            except TimeoutError:
                pass  # a bound: the loop's test says which

    async def _firmware(self, args: dict[str, Any]) -> object:
        """The ``firmware`` command; its module is imported at the first push, not
        by every gateway at every start (docs/decisions.md, 46)."""
        if self.firmware is None:
            from agent.ops.fwupdate import FirmwareCommands

            pollers = {p.name: p for p in self.pollers}
            self.firmware = FirmwareCommands(self.config, pollers, self.config.gateway.state_dir)
        return await self.firmware.handle(args)

    async def _request_reload(self) -> None:
        assert self._reload is not None
        self._reload()  # the supervisor re-reads the file: a bad one is refused, this one kept

    def _notify_status(self, doc: dict[str, Any]) -> None:
        self.notifier.status(summary(doc))

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gateway": self.config.gateway.id,
            "epoch": self.epoch,
            "uptime_s": round(time.time() - self.started, 1),
        }
        if self.batcher:
            out["batch"] = self.batcher.statistics()
        if self.spool:
            out["spool"] = self.spool.statistics()
        if self.uplink:
            out["uplink"] = self.uplink.statistics()
        out["buses"] = {p.name: p.statistics() for p in self.buses}
        if self.events is not None:
            out["events"] = self.events.statistics()
        if self.commands is not None:
            out["commands"] = self.commands.statistics()
        if self.confpush is not None:
            out["config_push"] = self.confpush.statistics()
        if self.firmware is not None and self.firmware.status:
            # per device: progress, then the outcome (vitals status, vitals hub firmware status)
            out["firmware"] = {d: dict(st) for d, st in self.firmware.status.items()}
        return out
