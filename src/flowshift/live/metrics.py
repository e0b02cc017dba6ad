"""Prometheus metrics of the VNIC daemon, read from the pipeline's plain counters at scrape time.

The event loop only bumps integers in dicts; this collector copies them when Prometheus scrapes
(prometheus_client serves from its own thread; a dict copy is one atomic step under the GIL).
The endpoint listens on 127.0.0.1 of the root network namespace: the daemon opens it before it
enters fs-host, and the socket stays where it was made.

With the PNIC attached, its figures come from the daemon's last report of the datapath
(`PnicVnic.snapshot`, taken every report interval): tier `pnic` traffic from the entries'
counters, offloads, refusals and returns by reason, second-cache occupancy, HELD punts handled,
and the datapath's per-CPU punt counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flowshift.live.control import PortRow
from flowshift.live.pipeline import Pipeline

PREFIX = "flowshift_live"


class PipelineCollector(Collector):
    def __init__(self, pipeline: Pipeline, ports: Callable[[], list[PortRow]],
                 pnic: Callable[[], dict[str, Any]] = dict) -> None:
        self.pipeline = pipeline
        self.ports = ports
        self.pnic = pnic

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self.pipeline.counters
        traffic = c.traffic()
        packets = CounterMetricFamily(f"{PREFIX}_packets", "Frames processed, by tier",
                                      labels=("tier", "machine", "direction"))
        nbytes = CounterMetricFamily(f"{PREFIX}_bytes", "Bytes of frames processed, by tier",
                                     labels=("tier", "machine", "direction"))
        for (tier, machine, direction), (n, b) in traffic.items():
            packets.add_metric([tier, machine, direction], n)
            nbytes.add_metric([tier, machine, direction], b)
        snap = self.pnic()
        for machine, direction, n, b in snap.get("traffic", []):
            packets.add_metric(["pnic", machine, direction], n)
            nbytes.add_metric(["pnic", machine, direction], b)
        yield packets
        yield nbytes
        verdicts = CounterMetricFamily(
            f"{PREFIX}_verdicts", "Frames by verdict and reason (drops: verdict drop, "
            "unparsed or bypass; the live host forwards nothing it did not process)",
            labels=("machine", "direction", "verdict", "reason"))
        for key, n in c.verdicts().items():
            verdicts.add_metric(list(key), n)
        yield verdicts
        created = CounterMetricFamily(f"{PREFIX}_flows_created", "Flows created",
                                      labels=("machine",))
        for machine, n in c.flows_created.copy().items():
            created.add_metric([machine], n)
        yield created
        flows = GaugeMetricFamily(f"{PREFIX}_flows", "Flow entries held, by owner tier",
                                  labels=("machine", "tier"))
        owned = snap.get("owned", {})  # PNIC flows: their shadows are in the chains' tables
        for m, (name, chain) in enumerate(zip(self.pipeline.names, self.pipeline.chains,
                                              strict=True)):
            if self.pipeline.machine_tier[m]:  # the guest's flows are in its own kernel
                continue
            flows.add_metric([name, "vnic"], len(chain.flows) - owned.get(name, 0))
            if snap:
                flows.add_metric([name, "pnic"], owned.get(name, 0))
        yield flows
        yield GaugeMetricFamily(f"{PREFIX}_first_cache_entries",
                                "Flow entries in the VNIC's first cache",
                                value=self.pipeline.first_cache())
        rx = CounterMetricFamily(f"{PREFIX}_rx_drops", "Frames lost before the daemon read "
                                 "them (its socket buffer was full)", labels=("port",))
        tx = CounterMetricFamily(f"{PREFIX}_tx_errors", "Frames the kernel refused to send",
                                 labels=("port",))
        for row in self.ports():
            rx.add_metric([row.ifname], row.rx_drops)
            tx.add_metric([row.ifname], row.tx_errors)
        yield rx
        yield tx
        if snap:
            yield from _pnic_metrics(snap)


def _pnic_metrics(snap: dict[str, Any]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    yield CounterMetricFamily(f"{PREFIX}_offloads", "Flows moved to the PNIC",
                              value=snap["offloads"])
    for name, key, text in (("refusals", "refused", "Offers the VNIC did not make or the "
                             "PNIC refused, by reason"),
                            ("returns", "returned", "Flows taken back from the PNIC, by reason"),
                            ("punts", "punts", "Packets the datapath punted, by reason")):
        fam = CounterMetricFamily(f"{PREFIX}_{name}", text, labels=("reason",))
        for reason, n in sorted(snap[key].items()):
            fam.add_metric([reason], n)
        yield fam
    yield CounterMetricFamily(f"{PREFIX}_pnic_forwarded", "Packets the fast path processed",
                              value=snap["forwarded"])
    yield CounterMetricFamily(f"{PREFIX}_held_handled", "Packets of held flows (handoffs in "
                              "progress) handled in software", value=snap["held_handled"])
    yield GaugeMetricFamily(f"{PREFIX}_second_cache_entries", "Flow entries in the PNIC's "
                            "second cache", value=snap["entries"])


def serve(pipeline: Pipeline, ports: Callable[[], list[PortRow]], port: int,
          pnic: Callable[[], dict[str, Any]] = dict) -> None:
    """Start the endpoint on 127.0.0.1:port (in the caller's network namespace)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(pipeline, ports, pnic))
    start_http_server(port, addr="127.0.0.1", registry=registry)
