"""Where replays run in parallel: local processes, a local Dask cluster, or an existing one.

One small interface over two libraries made for the job: `concurrent.futures`
(ProcessPoolExecutor) when Dask is not installed or not wanted, and Dask distributed
(`LocalCluster` for `--workers N`, `Client(address)` for `--scheduler ADDRESS`). Tasks are
module-level functions with plain arguments (paths, dicts, numbers), so any of them can run on
another machine: the paths must be readable there (shared storage).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from flowshift.closing import Closing

KINDS = ("auto", "processes", "dask")
INSTALL = "pip install 'flowshift[cluster]'"


class ClusterError(Exception):
    """No executor can be had as asked. One line."""


def dask_available() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Executor(Closing):
    """Submit tasks, wait for them as they finish; `describe()` goes into reports."""

    kind: str  # "processes", "dask-local" or "dask"
    workers: int
    startup_seconds: float
    address: str | None = None
    _pool: Any = None
    _client: Any = None
    _cluster: Any = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._client is not None:
            # pure=False: two equal calls are two runs (a sweep may repeat a point on purpose)
            return self._client.submit(fn, *args, pure=False, **kwargs)
        return self._pool.submit(fn, *args, **kwargs)

    def submit_spread(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        """One task per call, each asked of a worker of its own where there are enough (a
        Dask cluster may otherwise queue two on one worker while another idles): for tasks
        that work together and must run at once. A plain pool runs them at once anyway."""
        if self._client is None:
            return [self._pool.submit(fn, *args) for args in calls]
        workers = sorted(self._client.scheduler_info().get("workers", {}))
        if len(workers) < len(calls):
            return [self.submit(fn, *args) for args in calls]
        return [self._client.submit(fn, *args, pure=False, workers=[w],
                                    allow_other_workers=True)
                for args, w in zip(calls, workers, strict=False)]

    def as_completed(self, futures: list[Any]) -> Iterator[Any]:
        if self._client is not None:
            from distributed import as_completed as dask_completed

            yield from dask_completed(futures)  # type: ignore[no-untyped-call]
        else:
            yield from as_completed(futures)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "workers": self.workers, "address": self.address,
                "startup_seconds": round(self.startup_seconds, 6)}


def open_executor(workers: int | None = None, scheduler: str | None = None,
                  kind: str = "auto") -> Executor:
    """An executor: `scheduler` (a Dask scheduler's address) wins over `workers`; `kind`
    picks processes or a local Dask cluster for `workers` (auto: Dask when installed)."""
    if kind not in KINDS:
        raise ClusterError(f"executor must be one of {', '.join(KINDS)}, not {kind!r}")
    started = time.perf_counter()
    if scheduler is not None:
        if not dask_available():
            raise ClusterError(f"--scheduler needs Dask distributed: {INSTALL}")
        from distributed import Client

        try:
            client = Client(scheduler, timeout="10s")  # type: ignore[no-untyped-call]
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        n = len(client.scheduler_info().get("workers", {}))
        return Executor("dask", n, time.perf_counter() - started, scheduler, _client=client)
    n = workers or 1
    if n < 1:
        raise ClusterError(f"--workers must be at least 1, not {n}")
    if kind == "dask" or (kind == "auto" and dask_available()):
        if not dask_available():
            raise ClusterError(f"a Dask cluster needs Dask distributed: {INSTALL}")
        import dask
        from distributed import Client, LocalCluster

        # not daemonic: a replay with `--pnic process` starts the PNIC's own process
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(  # type: ignore[no-untyped-call]
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=40)
        client = Client(cluster)  # type: ignore[no-untyped-call]
        return Executor("dask-local", n, time.perf_counter() - started,
                        cluster.scheduler_address, _client=client, _cluster=cluster)
    return Executor("processes", n, time.perf_counter() - started, _pool=_process_pool(n))


def _process_pool(n: int) -> ProcessPoolExecutor:
    """Forked workers start with flowshift imported and its kernels loaded, but forking a
    process that runs other threads (a Dask client's, say) can copy a held lock: then a fork
    server, preloaded with the replay's modules and the sweep's plotting library, starts
    them."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["flowshift.shard_replay", "flowshift.sweep",
                                    "matplotlib.pyplot"])
        return ProcessPoolExecutor(n, mp_context=ctx)
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))


__all__ = ["KINDS", "ClusterError", "Executor", "Future", "dask_available", "open_executor"]
