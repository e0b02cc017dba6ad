"""`live up` and `live down`: build the host and start its daemon; stop it and remove all.

`up` takes the one-host lock (the state file), records each namespace before creating it, loads
the ruleset of each machine that starts at tier machine into its namespace, starts
the daemon detached and returns when the daemon answers on its control socket. Any failure
removes what was made. `down` reads the state file, so it works after a crash of `up` or of the
daemon: it stops the daemon (SIGTERM, then SIGKILL after a bounded wait) if it is still ours,
removes the namespaces it recorded and the run directory's files, and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flowshift.live import control as ctl
from flowshift.live import guest, pnic_setup, topology
from flowshift.live import state as st
from flowshift.live.engine import load_config, to_dict
from flowshift.live.names import LiveError, Names

DAEMON_MODULE = "flowshift.live.daemon"
STOP_WAIT = 5.0  # seconds the daemon gets to exit on SIGTERM before SIGKILL
POLL = 0.05


def up(config_path: str, names: Names, *, metrics_port: int = 0,
       timeout: float = 30.0, pnic: bool = True) -> st.LiveState:
    cfg = load_config(config_path)
    plan = topology.plan(cfg, names, config_path)
    if pnic:
        pnic_setup.build()  # compile errors before anything is made
    state = st.LiveState(version=st.VERSION, suffix=names.suffix,
                         config_path=os.path.abspath(config_path), config=to_dict(cfg),
                         metrics_port=metrics_port)
    st.create(names, state)
    try:
        def record(ns: str) -> None:
            state.netns.append(ns)
            st.save(names, state)

        state.ports, state.uplink = topology.build(plan, record)
        st.save(names, state)
        for m, machine in enumerate(plan.machines):
            if machine.inside:  # the machine tier: the guest router runs the chain in Linux
                guest.apply(cfg, m, machine.netns)
        if pnic:
            state.pnic, state.pins = True, str(pnic_setup.pin_dir(names.host))
            st.save(names, state)  # before the daemon pins anything
            pnic_setup.make_pair(names.host)
        proc = _spawn(names)
        state.pid = proc.pid
        st.save(names, state)
        _wait_ready(names, proc, timeout)
        state.ready = True
        st.save(names, state)
        return state
    except BaseException:
        _remove(names, state)
        raise


def down(names: Names) -> list[str]:
    """Remove the live host; the namespaces removed."""
    return _remove(names, st.load(names))


def daemon_running(pid: int, names: Names) -> bool:
    """Whether `pid` is our daemon (not a reused pid, not a zombie: both have other or empty
    command lines)."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return DAEMON_MODULE.encode() in cmdline and str(names.state).encode() in cmdline


def _spawn(names: Names) -> subprocess.Popen[bytes]:
    with open(names.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", DAEMON_MODULE, str(names.state)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)


def _wait_ready(names: Names, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise LiveError(f"the VNIC daemon exited with status {rc}: {_last_line(names.log)}")
        try:
            ctl.request(names.control, ctl.StatusRequest(), timeout=1.0)
            return
        except ctl.ControlError:
            pass
        if time.monotonic() >= deadline:
            raise LiveError(f"the VNIC daemon did not answer within {timeout:g} s "
                            f"(log: {_last_line(names.log)})")
        time.sleep(POLL)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def _stop_daemon(pid: int, names: Names) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, STOP_WAIT)):
        if not daemon_running(pid, names):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while daemon_running(pid, names) and time.monotonic() < deadline:
            time.sleep(POLL)
    if daemon_running(pid, names):
        raise LiveError(f"the VNIC daemon (pid {pid}) did not exit after SIGKILL")


def _remove(names: Names, state: st.LiveState) -> list[str]:
    _stop_daemon(state.pid, names)
    if state.pins:  # a daemon killed before its datapath's close left them
        pnic_setup.unpin(Path(state.pins))
    removed = topology.teardown(reversed(state.netns))
    st.remove(names)
    return removed
