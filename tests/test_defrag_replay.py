"""IP reassembly in the replay (host.py): held fragments get their datagram's verdict at their
own rows, in input order, packet by packet and in batches alike."""

from __future__ import annotations

from flowshift.config import parse_config
from flowshift.packet.build import udp_frame
from flowshift.packet.defrag import refragment
from flowshift.verdict import Verdict
from hosttools import FIREWALL_HOST, run
from tracetools import CLIENT, SERVER, S, write_pcap


def _fragments(ident: int, size: int = 3000) -> list[bytes]:
    dgram = udp_frame(src=CLIENT, dst=SERVER, sport=4321, dport=53, payload=b"x" * size,
                      ip_id=ident, df=False)
    return [dgram[:14] + f for f in refragment(dgram[14:], 1500)]


def test_reversed_datagram_forwarded_whole_and_incomplete_one_expires(tmp_path) -> None:
    done = _fragments(7)[::-1]  # last fragment first: nothing leaves until the first comes
    cut = _fragments(8)[:-1]  # never completes
    frames = [*done, *cut]
    path = write_pcap(tmp_path / "t.pcap", [(S + i, f) for i, f in enumerate(frames)])
    cfg = parse_config(FIREWALL_HOST, "test")
    runs = [run(path, cfg, policy="never", rows=rows) for rows in (None, 1, 2, 64)]
    for r in runs:
        assert [x.index for x in r.results] == list(range(len(frames)))
        assert [x.verdict for x in r.results[:len(done)]] == [Verdict.FORWARD] * len(done)
        assert {x.reason for x in r.results[len(done):]} == {"frag-expired"}
        assert [x.data for x in r.results] == [x.data for x in runs[0].results]
    # every fragment leaves as it came: same boundaries, same IPv4 id (no NAT here)
    assert [x.data for x in runs[0].results[:len(done)]] == done
