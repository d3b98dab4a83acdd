"""A workaround, in Ray's own terms, for placement groups that Ray Train V2 leaves behind when Ray Tune ends a
trial early; `raysparse.ray_tune` starts it for every sweep.

Why it exists: when ASHA stops a trial (or a trial reaches ASHA's max_t), Tune ends the trial actor at once;
the Train controller it owns dies with it, before it can remove its workers' placement group. Ray Train V2
leaves that to its PlacementGroupCleaner, which asks the State API (the dashboard) whether the controller
lives. Without a dashboard, or with two local Ray instances on one machine ("Found multiple active Ray
instances", seen here), the cleaner cannot ask, the group keeps its CPUs until the driver exits, and the next
trial waits forever. Drop this module once Ray Train removes the group itself when its controller dies.

How: `start_releaser` starts a `PlacementGroupReleaser` actor (no CPU, owned by the sweep's driver); each
trial's trainer gets `placement_group_callback(releaser)`, which tells the actor its controller and group when
the worker group starts; the actor pings each controller and removes the group of a dead one; `stop_releaser`
waits for the last ones and ends the actor.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group_table, remove_placement_group


class PlacementGroupReleaser:
    """Removes the placement group of a Train run whose controller died without removing it (see the module
    docstring). Run as an actor: it is told each controller and its group when the worker group starts,
    pings the controller every `interval_s`, and removes the group once the controller is dead and the group
    is still there.
    """

    def __init__(self, interval_s: float = 1.0):
        self._entries: list[tuple[Any, Any]] = []     # (controller ActorHandle, PlacementGroup)
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self.released = 0
        threading.Thread(target=self._loop, name="PlacementGroupReleaser", daemon=True).start()

    def register(self, controller, placement_group) -> None:
        with self._lock:
            self._entries.append((controller, placement_group))

    def drain(self, timeout_s: float = 60.0) -> int:
        """Wait until every registered controller is gone and its group handled; returns groups released."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._entries:
                    break
            time.sleep(self._interval_s / 2)
        return self.released

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval_s)
            with self._lock:
                entries = list(self._entries)
            for entry in entries:
                controller, pg = entry
                try:
                    ray.get(controller.__ray_ready__.remote(), timeout=10)
                    continue                                      # alive: its own shutdown removes the group
                except ray.exceptions.RayActorError:
                    pass                                          # dead (or unreachable for good)
                except Exception:  # noqa: BLE001 - a timeout or a hiccup: ask again next round
                    continue
                with self._lock:
                    self._entries.remove(entry)
                try:
                    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                        remove_placement_group(pg)
                        self.released += 1
                except Exception:  # noqa: BLE001 - already gone, or the cluster is shutting down
                    pass


def placement_group_callback(releaser):
    """A Train callback (run in the controller) that registers each worker group's placement group with
    `releaser`. Ray Train V2 adds run_config callbacks that are not UserCallbacks to its internal ones
    (DataParallelTrainer._create_default_callbacks: "allows custom workarounds built on top of internal
    callbacks"). None when this Ray version has no such hook."""
    try:
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:
        return None

    class RegisterPlacementGroup(WorkerGroupCallback):
        def __init__(self, releaser):
            self.releaser = releaser

        def after_worker_group_start(self, worker_group) -> None:
            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                self.releaser.register.remote(ray.get_runtime_context().current_actor, pg)
            except Exception:  # noqa: BLE001 - best effort: Ray's own cleaner still runs
                pass

    return RegisterPlacementGroup(releaser)


def start_releaser() -> "ray.actor.ActorHandle":
    """A `PlacementGroupReleaser` actor that reserves no CPU, owned by the calling driver."""
    return ray.remote(num_cpus=0, max_concurrency=4)(PlacementGroupReleaser).remote()


def stop_releaser(releaser: "ray.actor.ActorHandle", timeout_s: float = 60.0) -> int:
    """Wait (up to `timeout_s`) for the registered controllers to be handled, end the actor; returns the number
    of placement groups it released."""
    try:
        return ray.get(releaser.drain.remote(timeout_s))
    finally:
        ray.kill(releaser)
