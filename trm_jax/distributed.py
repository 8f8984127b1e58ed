"""Many processes, one run: JAX's multi-controller runtime, set up so nothing hangs.

Every process runs the same program (``jax.distributed.initialize`` connects them; the
seed mesh of :mod:`trm_jax.sharding` then spans every process's devices). This module
adds what a run needs around it:

* :class:`DistributedConfig`: ``coordinator`` (``HOST:PORT`` of process 0, or ``"auto"``
  where a cluster environment tells JAX: SLURM, Open MPI, TPU pods, Kubernetes),
  ``num_processes``, ``process_id``, and the timeouts; validated before anything starts.
* :func:`initialize`: CPU collectives through gloo, then ``jax.distributed.initialize``
  with ``initialization_timeout``. JAX aborts the whole process (a C++ fatal, not an
  exception) when the processes do not all connect in time; we wait for it in a helper
  thread and raise :class:`~trm_jax.errors.DistributedError` (one line) a few seconds
  before that, so the command line can print it and exit 2 (:func:`stuck` tells it to
  leave at once: the helper thread cannot be stopped).
* :func:`agree`: before compute, every process posts its resolved settings (or the error
  it stopped with, :func:`report_failure`) to the coordination service's key-value store
  (the one orbax's multi-host checkpointing uses) and reads every other's, with a
  timeout: different settings, or an error on any process, stop every process with one
  line, naming the process and what differs.
* :func:`is_writer`: process 0 writes the run folder; the others write only their
  checkpoint shards (orbax).

A process that dies later (killed, out of memory) is noticed by the others within
``heartbeat_timeout`` seconds: a watch thread ends each of them with one
line and exit code 2 a little before JAX's own check would abort it with a C++ stack dump,
and the run continues with ``--resume`` from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import re
import socket
import threading
from typing import Any

from trm_jax.errors import ConfigError, DistributedError

#: Seconds between our own give-up and JAX's (its connect aborts the process at its timeout).
_GRACE = 15
_KEY = "trm_jax/ready/"
_ALIVE = "trm_jax/alive/"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (default: it runs alone)."""

    coordinator: str | None = None
    """HOST:PORT of process 0 (every process gives the same), or 'auto' where the cluster
    environment tells JAX (SLURM, Open MPI, TPU, Kubernetes); default: one process"""
    num_processes: int | None = None
    """how many processes take part (with HOST:PORT)"""
    process_id: int | None = None
    """this process's index, 0..num_processes-1 (0 hosts the coordinator, writes the run folder)"""
    timeout: int = 120
    """seconds to wait for every process to connect, and to agree on the settings"""
    heartbeat_timeout: int = 60
    """seconds after which a silent (killed) process counts as dead and the others stop"""

    def __post_init__(self) -> None:
        for name in ("timeout", "heartbeat_timeout"):
            if not isinstance(getattr(self, name), int) or not 1 <= getattr(self, name) <= 2**63 - 1:
                raise ConfigError(f"distributed.{name} must be an integer in 1..2**63-1 (seconds), got "
                                  f"{getattr(self, name)!r}", field=name)
        given = [n for n in ("num_processes", "process_id") if getattr(self, n) is not None]
        if self.coordinator is None:
            if given:
                raise ConfigError(f"distributed.{given[0]} needs distributed.coordinator "
                                  "(HOST:PORT of process 0, or 'auto')", field=given[0])
            return
        if self.coordinator != "auto":
            _split_address(self.coordinator)
            if len(given) < 2:
                missing = [n for n in ("num_processes", "process_id") if n not in given]
                raise ConfigError(f"distributed.coordinator {self.coordinator}: also give "
                                  f"distributed.{missing[0]} (or use 'auto' on a cluster)",
                                  field=missing[0])
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"distributed.num_processes must be >= 1, got {self.num_processes}",
                              field="num_processes")
        if self.process_id is not None and not (
                0 <= self.process_id < (self.num_processes or self.process_id + 1)):
            allowed = f"0..{self.num_processes - 1}" if self.num_processes else ">= 0"
            raise ConfigError(f"distributed.process_id {self.process_id} is out of range; "
                              f"allowed: {allowed}", field="process_id")

    @property
    def enabled(self) -> bool:
        return self.coordinator is not None


def _split_address(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"distributed.coordinator {address!r}: expected HOST:PORT (port "
                          "1..65535) or 'auto'", field="coordinator")
    return match.group(1), int(match.group(2))


_STATE: dict[str, Any] = {"stuck": False, "posted": False, "config": None, "leaving": False}


def is_initialized() -> bool:
    """Whether this process is connected to a multi-process run (not while a connect that
    :func:`initialize` gave up on is still pending)."""
    import jax

    return not _STATE["stuck"] and jax.distributed.is_initialized()


def process_index() -> int:
    """This process's index (0 when not distributed); cheap, starts no backend."""
    return jax_process_index() if is_initialized() else 0


def jax_process_index() -> int:
    import jax

    return jax.process_index()


def is_writer() -> bool:
    """Whether this process writes run folders and metadata files (process 0, or alone)."""
    return process_index() == 0


def stuck() -> bool:
    """True after :func:`initialize` gave up on a connect that JAX still waits for: the
    process must then leave with ``os._exit`` (the waiting thread cannot be stopped)."""
    return _STATE["stuck"]


def initialize(config: DistributedConfig) -> None:
    """Joins the multi-process run ``config`` describes (nothing when it is not enabled, or
    when ``jax.distributed`` is already initialized). Call before any JAX computation.

    Raises:
      DistributedError: not every process connected within ``config.timeout`` seconds
        (naming whether the coordinator could be reached), or JAX refused the settings.
    """
    import jax

    if not config.enabled or jax.distributed.is_initialized():
        return
    # CPU collectives across processes (GPUs and TPUs use their own; this configures only
    # the CPU client, so it is right on every platform).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=config.timeout + _GRACE,
                  heartbeat_timeout_seconds=config.heartbeat_timeout,
                  shutdown_timeout_seconds=config.timeout)
    if config.coordinator != "auto":
        kwargs.update(coordinator_address=config.coordinator,
                      num_processes=config.num_processes, process_id=config.process_id)
    from trm_jax import native_stderr

    native_stderr.install(config.process_id)  # JAX's C++ abort when a peer dies: one line
    outcome: dict[str, BaseException] = {}

    def connect() -> None:
        try:
            jax.distributed.initialize(**kwargs)
        except BaseException as err:  # noqa: BLE001 -- reported by the waiting thread
            outcome["error"] = err

    thread = threading.Thread(target=connect, name="trm_jax-distributed-connect", daemon=True)
    thread.start()
    thread.join(config.timeout)
    who = "this process" if config.process_id is None else f"process {config.process_id}"
    if thread.is_alive():
        _STATE["stuck"] = True
        raise DistributedError(
            f"{who}: not all {config.num_processes or 'expected'} processes connected to the "
            f"coordinator {config.coordinator} within --distributed.timeout {config.timeout} s"
            f"{_reachability(config.coordinator)}; start every process with the same "
            "--distributed.coordinator and --distributed.num-processes")
    if "error" in outcome:
        err = outcome["error"]
        raise DistributedError(f"{who}: jax.distributed.initialize failed: "
                               f"{type(err).__name__}: {' '.join(str(err).split())}") from None
    _STATE["config"] = config
    _start_watch(config)


def _reachability(coordinator: str | None) -> str:
    if not coordinator or coordinator == "auto":
        return ""
    host, port = _split_address(coordinator)
    try:
        with socket.create_connection((host, port), timeout=2):
            return " (the coordinator answers: another process is missing)"
    except OSError as err:
        return f" (the coordinator {host}:{port} cannot be reached: {err.strerror or err})"


def _client():
    import jax

    # The coordination service's client: what orbax's multi-host utilities use too.
    return jax._src.distributed.global_state.client  # noqa: SLF001


def _timeout_ms() -> int:
    config = _STATE["config"]
    return 1000 * (config.timeout if config is not None else 120)


def agree(settings: dict[str, Any], extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every process's ``settings`` are the same, and no process stopped with an error.

    Posts ``{"settings", "extra"}`` for this process and reads every other's (each within
    the timeout). Returns every process's ``extra`` (index = process id), e.g. process 0's
    run folder for the others. Alone (not distributed): ``[extra]``.

    Raises:
      DistributedError: a process reported an error (:func:`report_failure`), did not
        report within the timeout, or was started with other settings (naming them).
    """
    if not is_initialized():
        return [extra or {}]
    import jax

    me, client = jax.process_index(), _client()
    client.key_value_set(_KEY + str(me), json.dumps({"settings": settings, "extra": extra or {}},
                                                   sort_keys=True, default=str))
    _STATE["posted"] = True
    posts = []
    for other in range(jax.process_count()):
        try:
            posts.append(json.loads(client.blocking_key_value_get(_KEY + str(other), _timeout_ms())))
        except Exception:  # noqa: BLE001 -- the service's timeout error
            raise DistributedError(
                f"process {me}: process {other} did not report its settings within "
                f"{_timeout_ms() // 1000} s (it stopped before compute, see its output)") from None
    for other, post in enumerate(posts):
        if "error" in post and other != me:
            raise DistributedError(f"process {me}: stopping because process {other} stopped: "
                                   f"{post['error']}")
    for other, post in enumerate(posts):
        if post["settings"] != posts[0]["settings"]:
            diff = _diff(posts[0]["settings"], post["settings"])
            raise DistributedError(
                f"process {me}: the processes were started with different settings: process "
                f"{other} differs from process 0 in {diff}; start every process with the same "
                "command (only --distributed.process-id differs)")
    return [post["extra"] for post in posts]


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [path]


def report_failure(message: str) -> None:
    """Tells the other processes (waiting in :func:`agree`) that this one stopped with
    ``message``: they stop too, naming it. Nothing when not distributed or already agreed."""
    if not is_initialized() or _STATE["posted"]:
        return
    import jax

    try:
        _client().key_value_set(_KEY + str(jax.process_index()), json.dumps({"error": message}))
        _STATE["posted"] = True
    except Exception:  # noqa: BLE001 -- the service may be gone; the others time out then
        pass


def _watch(me: int, count: int, heartbeat_timeout: int) -> None:
    """Runs in a daemon thread of every process of a multi-process run: posts a counter to
    the coordination service every ``period`` s and reads every other process's. A process
    whose counter has not moved for ``limit`` s (or a coordination service that stopped
    answering: process 0 died) ends this one with ONE line and exit code 2, before JAX's
    own heartbeat check would abort it with a C++ stack dump (at ``heartbeat_timeout``)."""
    import os
    import sys
    import time

    from trm_jax import native_stderr

    limit = max(heartbeat_timeout / 2, heartbeat_timeout - _GRACE)
    period = max(0.2, min(2.0, limit / 5))
    client, beat = _client(), 0
    seen = {other: (None, time.monotonic()) for other in range(count) if other != me}
    service_ok = time.monotonic()
    while not _STATE["leaving"]:
        now = time.monotonic()
        try:
            beat += 1
            client.key_value_set(f"{_ALIVE}{me}", str(beat), allow_overwrite=True)
            for other, (value, since) in seen.items():
                new = client.key_value_try_get(f"{_ALIVE}{other}")
                if new != value or new == "done":
                    seen[other] = (new, now)
            service_ok = now
        except Exception:  # noqa: BLE001 -- a missing key, or the service is gone
            pass
        dead = [o for o, (v, since) in seen.items() if now - since > limit and v != "done"]
        if now - service_ok > limit:
            dead = [0]
        if dead and not _STATE["leaving"]:
            print(f"error: process {me}: process {dead[0]} stopped answering for {limit:.0f} s "
                  "(killed, or out of memory?), so this one stops too; start every process "
                  "again with the same command plus --resume", file=sys.stderr, flush=True)
            sys.stdout.flush()
            native_stderr.finish()
            os._exit(2)
        time.sleep(period)


def _start_watch(config: DistributedConfig) -> None:
    import jax

    if jax.process_count() > 1:
        threading.Thread(target=_watch, args=(jax.process_index(), jax.process_count(),
                                              config.heartbeat_timeout),
                         name="trm_jax-peer-watch", daemon=True).start()


def shutdown() -> None:
    """Leaves the run (``jax.distributed.shutdown``: waits, up to the timeout, for every
    process to leave, so process 0's coordinator outlives the others)."""
    import jax

    if is_initialized() and not stuck():
        _STATE["leaving"] = True
        try:  # a process that has finished is not a dead one
            _client().key_value_set(f"{_ALIVE}{jax.process_index()}", "done",
                                    allow_overwrite=True)
        except Exception:  # noqa: BLE001
            pass
        try:
            jax.distributed.shutdown()
        except Exception:  # noqa: BLE001 -- a peer died; nothing is left to do together
            pass
