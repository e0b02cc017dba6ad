"""The live runtime: a real host on Linux.

Machines are network namespaces (`fs-m-<machine>`), the host is `fs-host` (no IP forwarding of
its own: one VNIC port per machine and an uplink), the outside is `fs-wire`. The VNIC is a
daemon process in `fs-host` that reads every frame from a packet source, runs the machine's
service chain on it (the reference engine) and sends the forwarded frame out of the right port.
A machine that starts at tier machine is a guest router running its chain as nftables, with its
addresses behind it in `fs-i-<machine>`, until it hands its chain and conntrack state over.

- names.py     every name and path the runtime creates, from one optional test suffix
- state.py     the state file: exactly what `live up` created, for `live down`
- topology.py  namespaces, veths, addresses, routes, neighbours, sysctls, offloads (pyroute2)
- source.py    packet sources and the ports' transmit side (AF_PACKET)
- pipeline.py  the VNIC's per-frame path: parse, classify, chain, Ethernet addresses
- control.py   the control socket's messages and client
- metrics.py   the Prometheus collector
- daemon.py    the VNIC daemon's event loop
- guest.py     the machine tier in Linux: the ruleset, the router's sysctls, ctnetlink
- ctimport.py  Linux conntrack entries as flow entries (what is carried, what is re-learned)
- handoff.py   the machine → VNIC handoff, step by step
- lifecycle.py `live up` and `live down`: build, start, wait for ready; stop, remove
- engine.py    the reference engine's public names, imported in one place
"""
