"""The VNIC daemon: `python -m flowshift.live.daemon STATE_FILE`, started by `flowshift live up`.

One thread runs the event loop (selectors): frames from the packet source go through the
pipeline and out of their port; control connections are answered; expired flows are swept on a
timer; machine-tier machines are watched for the offload policy, and handed over to the VNIC
when it wants one of their flows or when `live handoff` asks. SIGTERM and SIGINT end the loop
cleanly (a wakeup fd makes select return at once). The
Prometheus endpoint, if asked for, is served by prometheus_client's thread from the root
network namespace; everything else runs in fs-host.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

from pyroute2 import netns  # type: ignore[import-untyped]

from flowshift.flow import format_addr
from flowshift.live import control as ctl
from flowshift.live import guest, handoff, metrics
from flowshift.live.engine import (
    Flow,
    FlowView,
    OffloadPolicy,
    Tier,
    flow_dump,
    flow_line,
    parse_config,
)
from flowshift.live.names import Names
from flowshift.live.pipeline import Pipeline, Wiring, mac_bytes
from flowshift.live.pnic import PnicVnic, flow_text
from flowshift.live.source import AfPacketPorts, PacketSource
from flowshift.live.state import LiveState, load_path
from flowshift.services.conntrack_tcp import TcpState

SWEEP_INTERVAL = 10.0  # seconds between sweeps of expired flows
RETRY_HANDOFF = 10.0  # seconds before the policy tries again a handoff that failed
TICK = 1.0  # seconds between reads of the sockets' drop counters and checks of the state file
SECOND = 1_000_000_000
log = logging.getLogger("flowshift.live.daemon")


class Daemon:
    def __init__(self, state: LiveState) -> None:
        self.state = state
        self.names = Names(state.suffix)
        self.config = parse_config(state.config, state.config_path)
        assert state.uplink is not None
        wired = [*state.ports, state.uplink]
        self.port_names = [p.ifname for p in wired]
        self.port_machines = [p.machine for p in wired]
        self.pipeline = Pipeline(self.config, Wiring(
            tuple(mac_bytes(p.mac) for p in wired), tuple(mac_bytes(p.peer_mac) for p in wired)))
        self.started = time.monotonic()
        self.swept = 0
        self.stopping = False
        self.ports: AfPacketPorts | None = None
        self.pnic: PnicVnic | None = None  # the eBPF datapath, when `up` attached one
        self.sel = selectors.DefaultSelector()
        self.policy = OffloadPolicy(self.config.offload, self.config.pnic)
        self.guests: dict[int, guest.Conntrack] = {}  # machine-tier machines' ctnetlink
        self.retry_at: dict[int, float] = {}  # machine -> when the policy may try again

    def port_rows(self) -> list[ctl.PortRow]:
        """Per port: frames lost to a full receive buffer, frames the kernel would not send
        (as of the last tick; read from the metrics thread too, so only the loop updates)."""
        if self.ports is None:
            return []
        return [ctl.PortRow(name, machine, rx, tx) for name, machine, rx, tx in zip(
            self.port_names, self.port_machines, self.ports.rx_drops, self.ports.tx_errors,
            strict=True)]

    def open(self) -> None:
        """Metrics (root namespace), then fs-host: the ports and the control socket."""
        if self.state.metrics_port:
            metrics.serve(self.pipeline, self.port_rows, self.state.metrics_port,
                          lambda: self.pnic.snapshot if self.pnic is not None else {})
        netns.setns(self.names.host, flags=0)
        for m, machine in enumerate(self.config.machines):
            if self.pipeline.machine_tier[m]:
                self.guests[m] = guest.Conntrack(self.names.machine(machine.name))
        if self.state.pnic:  # the ports only transmit; the punt device is the source
            self.ports = AfPacketPorts(self.port_names, receive=False)
            self.pnic = PnicVnic(self.state, self.config, self.pipeline, self.ports,
                                 self.names.host)
            self.sel.register(self.pnic.source.sock, selectors.EVENT_READ, ("punt", None))
        else:
            self.ports = AfPacketPorts(self.port_names)
        # the packet source: the ports themselves until the PNIC datapath punts to a device
        self.source: PacketSource = self.ports
        for i, s in enumerate(self.source.sockets()):
            self.sel.register(s, selectors.EVENT_READ, ("port", i))
        path = self.names.control
        path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def run(self) -> None:
        assert self.ports is not None
        ports, pipeline = self.ports, self.pipeline
        receive, send, decide = self.source.receive, ports.send, pipeline.frame
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        next_tick = time.monotonic() + TICK
        log.info("ready: ports %s", ", ".join(self.port_names))
        while not self.stopping:
            timeout = max(0.0, min(next_sweep, next_tick) - time.monotonic())
            for key, _ in self.sel.select(timeout):
                kind, index = key.data
                if kind == "port":
                    for port, data in receive(index):
                        try:
                            out = decide(port, data, time.monotonic_ns())
                        except Exception:  # a bug must not take every machine off the net
                            log.exception("frame of %d bytes from %s", len(data),
                                          self.port_names[port] if port >= 0 else "source")
                            pipeline.count_error()
                            continue
                        if out >= 0:
                            send(out, data)
                elif kind == "punt":
                    assert self.pnic is not None
                    self.pnic.on_punts()
                elif kind == "listen":
                    self._accept()
                elif kind == "conn":
                    self._on_control(key.fileobj, index)  # type: ignore[arg-type]
                else:
                    self.wake_r.recv(64)
            if self.pnic is not None:
                self.pnic.tick()
            if time.monotonic() >= next_tick:
                ports.count_drops()
                next_tick = time.monotonic() + TICK
                if not self.names.state.exists():  # `down` ran without stopping us (an `up`
                    log.info("state file gone")    # killed before it recorded our pid)
                    break
                self._watch_guests()
            if time.monotonic() >= next_sweep:
                self.swept += pipeline.sweep(time.monotonic_ns())
                next_sweep = time.monotonic() + SWEEP_INTERVAL

    def close(self) -> None:
        if self.pnic is not None:
            self.pnic.close()
        if self.ports is not None:
            self.ports.close()
        for ct in self.guests.values():
            ct.close()
        self.names.control.unlink(missing_ok=True)
        log.info("stopped")

    # -- control ---------------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, ("conn", bytearray()))

    def _on_control(self, conn: socket.socket, buf: bytearray) -> None:
        try:
            chunk = conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf += chunk
        try:
            got = ctl.unframe(buf)
            reply = None
            if got is not None:
                reply = self._answer(ctl.decode_request(got[0]))
        except Exception as err:  # a bad request closes its connection, never the daemon
            log.warning("control: %s", err)
            chunk, got = b"", None
        if got is None and chunk:
            return
        self.sel.unregister(conn)
        try:
            if got is not None and reply is not None:
                conn.setblocking(True)
                conn.settimeout(5.0)  # the client reads at once; a stuck one is dropped
                conn.sendall(ctl.frame(reply))
        except OSError as err:
            log.warning("control: reply not sent: %s", err)
        finally:
            conn.close()

    def _answer(self, req: ctl.Request) -> ctl.Reply:
        if self.pnic is not None and isinstance(req, ctl.StatusRequest | ctl.FlowsRequest):
            self.pnic.refresh()  # the PNIC's flows and counters as of now
        if isinstance(req, ctl.FlowsRequest):
            return self.flows()
        if isinstance(req, ctl.HandoffRequest):
            return self.handoff(req.machine)
        if isinstance(req, ctl.OffloadRequest | ctl.ReturnRequest | ctl.PnicRequest):
            return self._pnic_answer(req)
        if self.ports is not None:
            self.ports.count_drops()
        return self.status()

    def status(self) -> ctl.Status:
        p = self.pipeline
        c = p.counters
        now = time.monotonic_ns()
        port = self.state.metrics_port
        return ctl.Status(
            pid=os.getpid(), uptime_s=round(time.monotonic() - self.started, 3),
            source="punt" if self.pnic is not None else "af_packet", ports=self.port_rows(),
            metrics=f"http://127.0.0.1:{port}/metrics" if port else "",
            traffic=[ctl.TrafficRow(t, m, d, n, b) for (t, m, d), (n, b) in
                     sorted(c.traffic().items())],
            verdicts=[ctl.VerdictRow(*k, n) for k, n in sorted(c.verdicts().items())],
            flows={name: sum(1 for f in chain.flows if f.expires > now)
                   for name, chain in zip(p.names, p.chains, strict=True)},
            flows_created=dict(sorted(c.flows_created.items())),
            first_cache=p.first_cache(), swept=self.swept,
            tiers={name: p.tier(m) for m, name in enumerate(p.names)},
            pnic=self.pnic.snapshot if self.pnic is not None else {})

    # -- the machine tier ----------------------------------------------------------------------

    def _guest_flows(self, m: int, now: int) -> list[Flow]:
        return handoff.flows_of(self.config, m, self.guests[m].dump(), now, Tier.MACHINE)

    def _watch_guests(self) -> None:
        """The offload policy on the guests' flows, as the replay's machine tier: a machine hands
        over at the first flow the policy wants (policy "never": never)."""
        if self.policy.name == "never":
            return
        for m in list(self.guests):
            if time.monotonic() < self.retry_at.get(m, 0.0):
                continue
            try:
                wanted = any(self.policy.wants(f)
                             for f in self._guest_flows(m, time.monotonic_ns()))
            except Exception as err:  # a netlink error: look again at the next tick
                log.warning("conntrack of %s: %s", self.pipeline.names[m], err)
                continue
            if wanted:
                log.info("policy %s: %s hands over", self.policy.name, self.pipeline.names[m])
                if isinstance(self.handoff(self.pipeline.names[m]), ctl.Failed):
                    self.retry_at[m] = time.monotonic() + RETRY_HANDOFF

    def handoff(self, name: str) -> ctl.Reply:
        p = self.pipeline
        if name not in p.names:
            return ctl.Failed(f"no machine named {name!r} (machines: {', '.join(p.names)})")
        m = p.names.index(name)
        if m not in self.guests:
            return ctl.Failed(f"machine {name!r} is at tier {p.tier(m)}: nothing to hand over")
        try:
            done = handoff.run(self.config, m, self.names.machine(name), self.guests[m], p)
        except Exception as err:  # netlink, nft, a bad entry: the guest keeps its flows
            log.exception("handoff of %s failed", name)
            return ctl.Failed(f"handoff of {name} failed: {err}")
        self.guests.pop(m).close()
        log.info("handoff of %s: %d flows in %.3f s, %d flushed from the guest", name,
                 done.flows, done.seconds, done.flushed)
        return ctl.HandoffDone(name, done.flows, done.flushed, done.lb_state,
                               round(done.seconds, 6),
                               {k: round(v, 6) for k, v in done.phases.items()})

    def _pnic_answer(self, req: ctl.OffloadRequest | ctl.ReturnRequest | ctl.PnicRequest
                     ) -> ctl.Done:
        pnic = self.pnic
        if pnic is None:
            return ctl.Done(False, 0, "no PNIC: the live host is up with --no-pnic")
        try:
            if isinstance(req, ctl.OffloadRequest):
                n, notes = pnic.offload_cmd(req.flow)
                return ctl.Done(bool(n) or not notes, n,
                                "; ".join([f"offloaded {n} flow(s)", *notes]))
            if isinstance(req, ctl.ReturnRequest):
                n = pnic.return_cmd(req.flow)
                return ctl.Done(True, n, f"returned {n} flow(s)")
            if req.action == "withdraw":
                n = pnic.withdraw()
                return ctl.Done(True, n, f"PNIC withdrawn: {n} flow(s) back, punt-all")
            if req.action == "crash":
                n = pnic.crash()
                return ctl.Done(True, n, f"PNIC crashed: {n} flow(s) resumed from the last "
                                "report, punt-all")
            if req.action == "restore":
                pnic.restore()
                return ctl.Done(True, 0, "PNIC restored: fast path on")
            return ctl.Done(False, 0, f"unknown PNIC action {req.action!r}")
        except ValueError as err:
            return ctl.Done(False, 0, str(err))

    def flows(self) -> ctl.Flows:
        now = time.monotonic_ns()
        views = [FlowView(flow.copy(), name, Tier(flow.owner).name.lower())
                 for name, chain in zip(self.pipeline.names, self.pipeline.chains, strict=True)
                 for flow in chain.flows if flow.expires > now]
        for m in self.guests:  # machine tier: the guest's own conntrack table
            views += [FlowView(f, self.pipeline.names[m], "machine")
                      for f in self._guest_flows(m, now)]
        rows = []
        for v in views:
            f = v.flow
            k, r = f.key, f.xlat.reversed()
            rows.append(ctl.FlowRow(
                machine=v.machine, tier=v.tier, proto=k.proto, family=k.family,
                original=(format_addr(k.src), format_addr(k.dst), k.sport, k.dport),
                reply=(format_addr(r.src), format_addr(r.dst), r.sport, r.dport),
                packets=(f.packets[0], f.packets[1]), bytes=(f.bytes[0], f.bytes[1]),
                tcp_state=TcpState(f.tcp.state).name if f.tcp is not None else "",
                expires_in_s=max(0, (f.expires - now) // SECOND), line=flow_line(v, now),
                flow=flow_text(k)))
        rows.sort(key=lambda r: (r.machine, r.line))
        return ctl.Flows(text=flow_dump(views, now), flows=rows)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    daemon = Daemon(load_path(Path(argv[0])))
    try:
        daemon.open()
        daemon.run()
    finally:
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
