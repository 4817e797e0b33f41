"""``gemma3-vision serve --ray``: the same HTTP API from N replicas with Ray Serve.

Each replica is a Ray actor that builds the service's app itself (the ``build_app`` it is given, which is
``create_app`` bound to the command's options): it loads the model and runs its own batching worker, exactly as
the local server does, and answers every route (``/v1/...``, ``/health``, ``/ready``, ``/metrics``) from its own
state. Ray Serve's HTTP proxy listens on ``host:port`` and spreads requests over the replicas; each response names
its replica in the ``x-gemma3-vision-replica`` header.

The cluster is joined as ``encode --ray`` joins it (``jobs.ray_encode``): an unreachable address is one line within
seconds, and Ray's INFO lines stay in its log files. Stopping (SIGTERM, Ctrl-C) deletes this application only, so a
shared cluster's other applications keep running; a local Ray instance started here is shut down with it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, OptionError
from ..jobs.ray_encode import _join_cluster, root_cause
from .server import SHUTDOWN_MARGIN_S
from .settings import ServeSettings

APP_NAME = "gemma3-vision"
REPLICA_HEADER = "x-gemma3-vision-replica"
_READY_TIMEOUT_S = 300.0  # replicas load the model before Serve calls them ready: seconds for random, more for 27B


@dataclass(frozen=True)
class ReplicaResources:
    """What each replica asks Ray for."""

    cpus: float
    gpus: float


def default_replicas(cluster: dict[str, float], device: str | None) -> int:
    """One replica per GPU on a GPU cluster (unless ``device`` is ``cpu``), else one."""
    gpus = int(cluster.get("GPU", 0))
    return gpus if gpus and device != "cpu" else 1


def plan_replicas(cluster: dict[str, float], device: str | None, replicas: int,
                  cpus_per_replica: float | None = None) -> ReplicaResources:
    """Resources per replica on a cluster (``ray.cluster_resources()``): one GPU each where the cluster has GPUs
    (unless ``device`` is ``cpu``), else an equal share of the CPUs, up to 4 (torch's intra-op threads; Ray sets
    ``OMP_NUM_THREADS`` to it) and at least 1. Decoding runs inside each replica, so no CPU is kept aside for it.

    Raises:
        OptionError: fewer than one replica, a CUDA device on a cluster without GPUs, or more replicas than fit.
    """
    if replicas < 1:
        raise OptionError(f"--replicas must be at least 1, got {replicas}")
    gpus, cpus = int(cluster.get("GPU", 0)), cluster.get("CPU", 0)
    wants_cuda = device is not None and device.startswith("cuda")
    if wants_cuda and not gpus:
        raise OptionError(f"device {device!r} asked for, but the Ray cluster has no GPUs")
    if gpus and device != "cpu":
        if replicas > gpus:
            raise OptionError(f"{replicas} replicas need a GPU each; the Ray cluster has {gpus}")
        return ReplicaResources(cpus_per_replica or 1, 1)
    per_replica = cpus_per_replica or max(1, min(4, int(cpus // replicas)))
    if replicas * per_replica > cpus:
        raise OptionError(f"{replicas} replicas x {per_replica:g} CPUs do not fit a Ray cluster of {cpus:g} CPUs")
    return ReplicaResources(per_replica, 0)


class ReplicaHeader:
    """ASGI middleware: names the replica in every HTTP response's headers."""

    def __init__(self, app: Any, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


class Replica:
    """One replica's state: the builder of its app, called on the replica once Ray has placed it."""

    def __init__(self, build_app: Callable[[], Any]):
        self.build_app = build_app

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve's hook for an app built on the replica
        from ray import serve

        app = self.build_app()
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app


@dataclass
class RayService:
    """A running ``--ray`` service: where it listens, and how to stop it."""

    url: str
    replicas: int
    resources: ReplicaResources
    started_ray: bool

    def stop(self) -> None:
        """Delete this application (in-flight requests finish within Serve's graceful bound); shut down Serve and
        Ray too when this process started them."""
        import ray
        from ray import serve

        serve.delete(APP_NAME)
        if self.started_ray:
            serve.shutdown()
            ray.shutdown()


def build_app(model: str, load_options: dict[str, Any], settings: ServeSettings) -> Any:
    """A replica's app: the model loaded here, before Ray Serve calls the replica ready (so no replica answers
    "loading"), under ``create_app`` as the local server runs it."""
    from ..api import load
    from .app import create_app

    return create_app(load(model, **load_options), settings)


def run_with_ray(model: str, load_options: dict[str, Any], settings: ServeSettings, *, replicas: int | None,
                 address: str | None, host: str, port: int, device: str | None) -> int:
    """``gemma3-vision serve --ray``: deploy, say where it listens, serve until SIGTERM or Ctrl-C (raised here as
    ``KeyboardInterrupt`` by the command line), then stop; the exit code."""
    service = None
    try:
        service = serve_with_ray(functools.partial(build_app, model, load_options, settings), replicas=replicas,
                                 address=address, host=host, port=port, device=device,
                                 max_ongoing_requests=settings.max_queue + settings.max_batch_size,
                                 graceful_shutdown_s=settings.timeout + SHUTDOWN_MARGIN_S)
        print(f"serving {model} on {service.url} from {service.replicas} Ray Serve replicas "
              f"({service.resources.cpus:g} CPU, {service.resources.gpus:g} GPU each)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # a stop asked for, also while the replicas start (serve_with_ray cleans up then)
        if service is not None:
            service.stop()
    return 0


def serve_with_ray(build_app: Callable[[], Any], *, replicas: int | None = None, address: str | None = None,
                   host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
                   cpus_per_replica: float | None = None, max_ongoing_requests: int = 1024,
                   graceful_shutdown_s: float = 20.0) -> RayService:
    """Deploy ``replicas`` copies of ``build_app()`` behind Ray Serve's proxy on ``host:port``; returns once every
    replica has loaded its model and answers. ``replicas`` None: ``default_replicas``.

    Args:
        build_app: makes the service's ASGI app on a replica; it must pickle (a module-level function or a
            ``functools.partial`` of one), and the model it names must load on every node (a hub id, a
            ``random`` model, or a path on storage that every node sees).
        address: the cluster to join, as ``encode --ray`` takes it; None joins ``RAY_ADDRESS`` or starts a
            local Ray instance. Ignored when ``ray.init`` was already called.
        max_ongoing_requests: requests Ray Serve lets into a replica at once; the app's own queue bound
            (``--max-queue``) and its 429s must be the limit, so this is set above it.
        graceful_shutdown_s: how long a stopping replica lets its requests in flight finish (the local server's
            bound is ``--timeout`` + 1 s; ``run_with_ray`` passes the same).

    Raises:
        ConfigError: Ray Serve is not installed, or the cluster cannot be reached or joined.
        OptionError: replica counts or a device that the cluster cannot take.
    """
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigError("--ray needs Ray Serve: pip install 'gemma3-vision[ray]'") from None
    started_ray = not ray.is_initialized() and address in (None, "local") and not _ray_address_set()
    if not ray.is_initialized():
        _join_cluster(ray, address)
    try:
        cluster = ray.cluster_resources()
        replicas = replicas or default_replicas(cluster, device)
        resources = plan_replicas(cluster, device, replicas, cpus_per_replica)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines stay in the Serve log files
        serve.start(http_options={"host": host, "port": port})
        deployment: Any = serve.deployment(
            serve.ingress()(Replica), name="encoder", num_replicas=replicas,
            ray_actor_options={"num_cpus": resources.cpus, "num_gpus": resources.gpus,
                               # as the local server sets it: torch's threads sleep between forward passes
                               "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}},
            max_ongoing_requests=max_ongoing_requests, graceful_shutdown_timeout_s=graceful_shutdown_s,
        )
        try:
            serve.run(deployment.bind(build_app), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica failed to start (its model did not load): Ray's text, last line first
            raise ConfigError(f"the Ray Serve replicas did not start: {root_cause(str(e)) or 'unknown error'}") from None
    except BaseException:  # the replicas could not start, or a stop was asked for meanwhile
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if started_ray:
            ray.shutdown()
        raise
    return RayService(f"http://{host}:{port}", replicas, resources, started_ray)


def _ray_address_set() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))
