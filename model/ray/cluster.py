"""Connecting to Ray and sizing the workers, shared by the batch jobs and the Ray Serve deployment.

`connect(None)` (or "local") starts a private Ray instance on 127.0.0.1 (no dashboard, nothing on other
addresses); any other address ("auto", "10.0.0.5:6379", "ray://...") joins an existing cluster, as `ray.init` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sprm_kernels.model.core.threads import set_threads

LOCAL = "local"


@dataclass(frozen=True)
class Workers:
    """How many engine actors, and what each one holds (Ray resources; torch threads = whole CPUs, at least 1)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self):
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers: expected an int >= 1, got {self.num_workers!r}")
        for name in ("cpus_per_worker", "gpus_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise ValueError("cpus_per_worker, gpus_per_worker: expected at least one of them > 0")

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Start (address None / "local") or join (any other address) Ray; a no-op when Ray is already initialized in
    this process (the caller's instance is used as it is). Returns the `ray` module."""
    if address in (None, "", LOCAL):
        _loopback_node()  # before Ray is imported where possible: its workers inherit the environment
    try:
        import ray
    except ImportError:
        raise ValueError("--ray: needs Ray installed (pip install 'ray[data,serve]')") from None
    if ray.is_initialized():
        return ray
    if address in (None, "", LOCAL):
        _loopback_node()
        ray.init(
            address="local", include_dashboard=False, num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus,
            _node_ip_address="127.0.0.1", logging_level="warning",
        )  # fmt: skip
    else:
        ray.init(address=address, logging_level="warning")
    return ray


# -- Ray-version-specific: a private instance on loopback only (checked with Ray 2.60) ---------------------------


def _loopback_node() -> None:
    """Make a private Ray's node IP 127.0.0.1. Ray turns `_node_ip_address="127.0.0.1"` into the machine's
    routable address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (read when Ray is imported, so the constant is
    set too when Ray was imported first); its servers then listen on 127.0.0.1 only."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def keep_replica_on_loopback() -> None:
    """In a Ray Serve replica of a loopback node: its inter-deployment gRPC server (unused here: one deployment)
    listens on "[::]:0" in Ray Serve 2.60 whatever the node IP; bind it to 127.0.0.1 instead. A no-op elsewhere."""
    import ray

    if ray.util.get_node_ip_address() != "127.0.0.1":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "sprm_loopback", False):
        return

    def add_port(server, address):
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    add_port.sprm_loopback = True
    replica.add_port_to_grpc_server = add_port


def set_torch_threads(threads: int) -> None:
    """In a worker: intra-op threads = its CPUs (1 by default), so that N workers on N cores do not oversubscribe."""
    from transformers.utils import logging as transformers_logging

    set_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # and what the worker's own children inherit
    transformers_logging.disable_progress_bar()  # no "Loading weights" bar per actor in the driver's output


# -- command-line options shared by `sprm eval --ray` and `train collect --ray` ----------------------------------


def count(text: str) -> int:
    """An argparse type for --num-workers, --replicas: an int >= 1."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def amount(text: str) -> float:
    """An argparse type for --cpus-per-worker, --gpus-per-worker: a number >= 0."""
    import argparse

    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_ray_arguments(parser, *, out_help: str | None = None, out_flag: str = "--out") -> None:
    """--ray [ADDRESS], --num-workers, --cpus-per-worker, --gpus-per-worker (and `out_flag` when `out_help`)."""
    group = parser.add_argument_group("Ray (see docs/ray.md)")
    group.add_argument(
        "--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
        help="run on Ray: alone, a private instance on 127.0.0.1; ADDRESS ('auto', HOST:PORT) joins a cluster",
    )  # fmt: skip
    group.add_argument("--num-workers", type=count, default=1, help="engine actors, one engine each (default 1)")
    group.add_argument("--cpus-per-worker", type=amount, default=1.0, help="CPUs per actor = its torch threads")
    group.add_argument("--gpus-per-worker", type=amount, default=0.0, help="GPUs per actor (> 0: the engine on cuda)")
    if out_help:
        group.add_argument(out_flag, default=None, help=out_help)


def workers_from_args(parser, args) -> Workers | None:
    """The `Workers` of the parsed options (None without --ray); a usage error (exit 2) names the bad option."""
    ray_only = [f"--{name.replace('_', '-')}" for name, default in
                (("num_workers", 1), ("cpus_per_worker", 1.0), ("gpus_per_worker", 0.0), ("rows", None))
                if getattr(args, name, default) != default]  # fmt: skip
    if args.ray is None:
        if ray_only:
            parser.error(f"{', '.join(ray_only)}: only with --ray")
        return None
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        parser.error("--ray: needs Ray installed (pip install 'ray[data,serve]')")
    try:
        return Workers(args.num_workers, args.cpus_per_worker, args.gpus_per_worker)
    except ValueError as error:
        parser.error(f"--cpus-per-worker, --gpus-per-worker: {error}")


def check_model_dir(path: str) -> None:
    """Before any actor starts (an actor that cannot load its engine would be restarted again and again)."""
    if not os.path.isdir(path):
        raise ValueError(f"model: {path}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model: {path}: not a model folder (no config.json)")
