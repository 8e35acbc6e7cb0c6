"""The Ray side of ``rglf score``: join or start Ray, check what can be placed, stream batches to scorer actors.

Shape (driver-driven streaming on Ray core; no Ray Data):

    driver: pending samples, read row group by row group -> batches of ``batch_size``
        for each batch: pixels = load_images.remote(batch)          (a CPU task)
                        result = scorer.score.remote(pixels)         (an actor call)
    actors: one frozen model each; score + commit the batch's part files; return its index rows

The driver keeps at most ``prefetch`` batches in flight per actor (one scoring, the next one's
images loading), so memory and the object store hold O(workers) batches whatever the dataset
size, the first batch is sent as soon as the first row group is read, and every result is a
committed batch (the progress bar counts those). Ray resolves the actor call's argument (the
image task's output) before the call runs, so image loading overlaps scoring.

Placement is checked before anything starts (``plan_placement``): a scorer actor that no node
can ever host (CUDA requested on a cluster without GPUs, more CPUs / custom resources than any
node has) or more actors than the cluster can hold fails at once (``ResourcesUnavailable``, exit
5). When the actors would leave no CPU for the image tasks, images are loaded inside the
actors instead (slower, but the job always makes progress). On a cluster that may grow (an
autoscaler), an unplaceable request is re-checked for ``placement_timeout`` seconds first. While
nothing commits, the driver says what it waits for every ``WAIT_NOTICE_S`` seconds.

Failures: an actor that dies (node lost, OOM-killed) has its in-flight batches re-queued to the
live actors (same batch, same part names: no duplicates) and is restarted by Ray
(``max_restarts=-1``) where capacity exists; the job finishes on the remaining actors either
way. A batch that fails ``MAX_ATTEMPTS`` times, an exception inside the scorer (a bug) or an
actor that cannot start (its ``__init__`` raised: e.g. the checkpoint does not load) ends the
job with that error.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

WAIT_NOTICE_S = 60.0  # while nothing commits, say what the job waits for this often
MAX_ATTEMPTS = 4  # a batch whose actor died this many times ends the job


class ResourcesUnavailable(RuntimeError):
    """The scorer actors (or the requested devices) can never be placed on this cluster."""

    exit_code = 5  # cli.EXIT_CODES: impossible resources


@dataclass
class Placement:
    """What the cluster can host: how many scorer actors, and whether image tasks fit beside them."""

    actors: int
    images_in_actor: bool
    detail: str


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def plan_placement(need: dict[str, float], workers: int, image_cpus: float, device: str) -> Placement:
    """Check the live nodes' TOTAL resources against ``workers`` actors of ``need`` (not what is free now)."""
    nodes = _node_resources()
    need = {k: v for k, v in need.items() if v > 0}
    if device == "cuda" and not any(n.get("GPU", 0) > 0 for n in nodes):
        return Placement(0, False, "--device cuda was requested but the cluster has no GPU (CUDA is absent)")
    fits = []
    for n in nodes:
        per = [math.floor(n.get(r, 0.0) / v + 1e-9) for r, v in need.items()]
        fits.append(min(per) if per else workers)
    total = sum(fits)
    if total == 0:
        largest = max(nodes, key=lambda n: n.get("CPU", 0.0), default={})
        have = ", ".join(f"{r} {largest.get(r, 0):g}" for r in need) or "nothing"
        want = ", ".join(f"{r} {v:g}" for r, v in need.items())
        return Placement(0, False, f"no node can host one scorer actor (each needs {want}; the largest node has {have})")
    # place the actors greedily, then see whether a CPU slot for an image task is left anywhere
    left = [dict(n) for n in nodes]
    placed = 0
    for node, k in zip(left, fits, strict=True):
        take = min(k, workers - placed)
        for r, v in need.items():
            node[r] = node.get(r, 0.0) - take * v
        placed += take
        if placed >= workers:
            break
    images_in_actor = image_cpus > 0 and not any(n.get("CPU", 0.0) + 1e-9 >= image_cpus for n in left)
    want = ", ".join(f"{r} {v:g}" for r, v in need.items())
    return Placement(min(total, workers), images_in_actor, f"the cluster can host {total} scorer actor(s) of {want}")


@dataclass
class _Batch:
    seq: int
    rows: Any  # pa.Table of pending samples
    attempts: int = 0


@dataclass
class _Slot:
    index: int
    handle: Any
    state: str = "starting"  # starting | up | down
    ping: Any = None  # ObjectRef of a pending ping (readiness / restart probe)
    inflight: dict = field(default_factory=dict)  # result ObjectRef -> _Batch
    up_since: float | None = None
    up_seconds: float = 0.0  # time this actor was available (for the idle share)
    node: str | None = None


@dataclass
class PoolStats:
    """What the pool measured: first result, actor availability vs busy time, restarts, re-queued batches."""

    first_result_s: float | None = None
    actor_seconds: float = 0.0  # summed over actors: time each was up
    busy_seconds: float = 0.0  # summed over batches: time inside the scorer call
    restarts: int = 0
    requeued: int = 0
    images_in_actor: bool = False

    @property
    def idle_share(self) -> float | None:
        """Share of the actors' available time spent waiting for a batch (scheduler idle share)."""
        if self.actor_seconds <= 0:
            return None
        return max(0.0, 1.0 - self.busy_seconds / self.actor_seconds)


class ScoringPool:
    """``workers`` scorer actors fed by the driver; see the module docstring."""

    def __init__(
        self,
        actor_cls: type,
        actor_kwargs: dict[str, Any],
        load_fn: Callable,
        load_kwargs: dict[str, Any],
        *,
        workers: int,
        cpus_per_worker: float,
        gpus_per_worker: float,
        worker_resources: dict[str, float],
        image_cpus: float,
        images_in_actor: bool,
        prefetch: int = 2,
        log: Callable[[str], None] = print,
    ):
        import ray

        self.log = log
        self.prefetch = prefetch
        self.images_in_actor = images_in_actor
        self.load_kwargs = load_kwargs
        self._need = {"CPU": cpus_per_worker, "GPU": gpus_per_worker, **worker_resources}
        remote_cls = ray.remote(actor_cls)
        options: dict[str, Any] = {"num_cpus": cpus_per_worker, "max_restarts": -1, "max_task_retries": 0}
        if gpus_per_worker:
            options["num_gpus"] = gpus_per_worker
        if worker_resources:
            options["resources"] = dict(worker_resources)
        self._load = None if images_in_actor else ray.remote(load_fn).options(num_cpus=image_cpus, max_retries=3)
        self.slots = []
        for i in range(workers):
            handle = remote_cls.options(**options).remote(**actor_kwargs)
            self.slots.append(_Slot(i, handle, ping=handle.ping.remote()))
        self.stats = PoolStats(images_in_actor=images_in_actor)
        self._t0 = time.monotonic()

    # ---- submission ------------------------------------------------------------------------

    def _submit(self, slot: _Slot, batch: _Batch) -> None:
        if self._load is None:
            ref = slot.handle.score_batch.remote(batch.rows, load_kwargs=self.load_kwargs)
        else:
            ref = slot.handle.score_batch.remote(self._load.remote(batch.rows, **self.load_kwargs))
        slot.inflight[ref] = batch

    def _set_state(self, slot: _Slot, state: str) -> None:
        now = time.monotonic()
        if slot.state == "up" and state != "up" and slot.up_since is not None:
            slot.up_seconds += now - slot.up_since
            slot.up_since = None
        if state == "up" and slot.state != "up":
            slot.up_since = now
        slot.state = state

    # ---- the loop ---------------------------------------------------------------------------

    def run(self, batches: Iterator[Any], on_result: Callable[[Any], None],
            unplaceable: Callable[[], str | None] | None = None, placement_timeout: float = 0.0) -> PoolStats:
        """Send every batch, call ``on_result`` with each scorer result (a committed batch), in completion order.

        ``unplaceable()`` (checked while no actor is up) returns a reason when the cluster can
        no longer host any actor; after ``placement_timeout`` seconds of that the job fails.
        """
        import ray

        retry: deque[_Batch] = deque()
        source = iter(batches)
        seq = 0
        exhausted = False
        last_progress = time.monotonic()
        last_notice = last_progress
        none_up_since: float | None = time.monotonic()
        last_check = 0.0

        def next_batch() -> _Batch | None:
            nonlocal exhausted, seq
            if retry:
                return retry.popleft()
            if exhausted:
                return None
            rows = next(source, None)
            if rows is None:
                exhausted = True
                return None
            seq += 1
            return _Batch(seq, rows)

        while True:
            # Starting actors get work too: Ray holds the calls until the actor is ready, and meanwhile
            # the first batches' image tasks run (worker start-up and imports overlap the model load).
            for slot in sorted((s for s in self.slots if s.state in ("up", "starting")), key=lambda s: len(s.inflight)):
                while len(slot.inflight) < self.prefetch:
                    batch = next_batch()
                    if batch is None:
                        break
                    self._submit(slot, batch)
            inflight = {ref: slot for slot in self.slots for ref in slot.inflight}
            if exhausted and not retry and not inflight:
                break
            pings = {slot.ping: slot for slot in self.slots if slot.ping is not None}
            refs = list(inflight) + list(pings)
            ready, rest = ray.wait(refs, num_returns=1, timeout=0.5)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                if ref in pings:
                    self._on_ping(pings[ref], ref)
                else:
                    slot = inflight[ref]
                    batch = slot.inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                            ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                            ray.exceptions.NodeDiedError) as err:
                        self._requeue(slot, batch, retry, err)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        raise _unwrap(err) from None
                    if self.stats.first_result_s is None:
                        self.stats.first_result_s = time.monotonic() - self._t0
                    self.stats.busy_seconds += float(getattr(result, "seconds", 0.0) or 0.0)
                    last_progress = last_notice = time.monotonic()
                    on_result(result)
            now = time.monotonic()
            if any(s.state == "up" for s in self.slots):
                none_up_since = None
            elif none_up_since is None:
                none_up_since = now
            if (none_up_since is not None and unplaceable is not None and now - none_up_since > 5.0
                    and now - last_check >= 5.0):
                last_check = now
                reason = unplaceable()
                if reason and now - none_up_since >= placement_timeout:
                    raise ResourcesUnavailable(f"no scorer actor can be placed: {reason}")
            if now - last_notice >= WAIT_NOTICE_S:
                last_notice = now
                self.log(self._waiting_line(now - last_progress))

    def _on_ping(self, slot: _Slot, ref) -> None:
        import ray

        slot.ping = None
        try:
            slot.node = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            if getattr(err, "actor_init_failed", False):
                raise ScorerStartError(f"a scorer actor could not start: {_last_line(str(err))}") from None
            self._set_state(slot, "down")
            slot.ping = slot.handle.ping.remote()  # answered once Ray has restarted the actor
            return
        except ray.exceptions.RayTaskError as err:  # ScorerActor.ping re-raises what __init__ caught
            raise _unwrap(err) from None
        if slot.state != "up":
            if slot.up_seconds or slot.state == "down":
                self.stats.restarts += 1
            self._set_state(slot, "up")

    def _requeue(self, slot: _Slot, batch: _Batch, retry: deque, err: Exception) -> None:
        batch.attempts += 1
        self.stats.requeued += 1
        if batch.attempts >= MAX_ATTEMPTS:
            raise RuntimeError(f"a batch failed {batch.attempts} times (its scorer actor kept dying): {_last_line(str(err))}")
        retry.appendleft(batch)
        if slot.state == "up":
            self._set_state(slot, "down")
            if slot.ping is None:
                slot.ping = slot.handle.ping.remote()

    def _waiting_line(self, quiet_for: float) -> str:
        states = [s.state for s in self.slots]
        want = ", ".join(f"{r} {v:g}" for r, v in self._need.items() if v > 0)
        return (f"waiting: nothing committed for {quiet_for:.0f} s; scorer actors up {states.count('up')}/{len(states)}"
                f" (each needs {want}), starting {states.count('starting')}, restarting {states.count('down')}")

    def finish(self) -> PoolStats:
        """Close the actors' availability windows (idempotent) and return the stats."""
        for slot in self.slots:
            self._set_state(slot, "gone")
            self.stats.actor_seconds += slot.up_seconds
            slot.up_seconds = 0.0
        return self.stats

    def shutdown(self) -> None:
        """Kill the actors (in-flight batches are lost; their leftovers are removed by the next run)."""
        import ray

        for slot in self.slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone
                pass


class ScorerStartError(RuntimeError):
    """A scorer actor's constructor failed (the checkpoint, the device...)."""

    exit_code = 2


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _unwrap(err: Exception) -> BaseException:
    """The user exception inside a RayTaskError when it is an expected failure (has ``exit_code``), else the error."""
    cause = getattr(err, "cause", None)
    if cause is not None and isinstance(getattr(cause, "exit_code", None), int):
        return cause
    return err


# --------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------


def connect(*, address: str | None, num_cpus: int | None, need_cpus: float, object_store_mb: int | None,
            temp_dir: str | None, verbose: bool, log: Callable[[str], None]) -> bool:
    """Join a cluster (``address`` / ``RAY_ADDRESS``) or start a local instance; True if we must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        log(f"joined the Ray cluster at {address}")
        return True
    # Ray CPUs are scheduling tokens: the scorer actors hold theirs for the whole job, so a
    # machine whose cores all go to actors would leave none for the image tasks. Give the local
    # instance enough logical CPUs for the actors plus one image task (unless --num-cpus says).
    kwargs: dict[str, Any] = {"num_cpus": num_cpus or max(os.cpu_count() or 1, math.ceil(need_cpus)),
                              "include_dashboard": False, **quiet}
    if object_store_mb:
        kwargs["object_store_memory"] = object_store_mb * 2**20
    if temp_dir is not None:
        kwargs["_temp_dir"] = str(temp_dir)
    ray.init(**kwargs)
    log(f"started a local Ray instance ({kwargs['num_cpus']} CPUs)")
    return True
