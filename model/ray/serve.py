"""`sprm serve --ray --replicas N`: the server's own FastAPI app (`serving.app.create_app`: the same routes, contract,
errors, bearer auth and limits) in each of N Ray Serve replicas, behind Serve's HTTP proxy on --host / --port.

Each replica loads its engine (`load_engine(model, engine=...)`) and builds the app around it, so it batches the
`/score` requests it holds exactly as the single-process server does (`max_ongoing_requests` bounds how many Serve
hands one replica at a time: the room its batches have to grow). Serve spreads requests over the replicas and
replaces a replica that dies; requests in flight on a dying replica may fail, later ones go to the others.
Autoscaling: `--max-replicas M` (> --replicas) lets Serve scale between --replicas and M replicas, aiming at
`--target-ongoing-requests` requests per replica.

    sprm serve --ray --replicas 2 --port 8001            # a private Ray on 127.0.0.1, proxy on 127.0.0.1:8001
    sprm serve --ray auto --replicas 4 --gpus-per-replica 1 --host 0.0.0.0 --token ...   # on a running cluster
"""

from __future__ import annotations

import os
from dataclasses import dataclass

APP_NAME = "sprm"


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas, what each holds, and Serve's per-replica request bound."""

    replicas: int = 1
    max_replicas: int | None = None  # > replicas: autoscale between replicas and max_replicas
    target_ongoing_requests: float = 16.0  # the autoscaler's aim per replica
    max_ongoing_requests: int = 64  # requests Serve hands one replica at once (its batches can grow to this)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self):
        for name in ("replicas", "max_ongoing_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.max_replicas is not None and (
            not isinstance(self.max_replicas, int) or self.max_replicas < self.replicas
        ):
            raise ValueError(f"max_replicas: expected an int >= replicas ({self.replicas}), got {self.max_replicas!r}")
        for name in ("target_ongoing_requests", "cpus_per_replica", "gpus_per_replica"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")

    def deployment_options(self) -> dict:
        """The keyword arguments of `Deployment.options`."""
        options = dict(
            max_ongoing_requests=self.max_ongoing_requests,
            ray_actor_options={"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
        )
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }  # fmt: skip
        else:
            options["num_replicas"] = self.replicas
        return options


class Replica:
    """One Serve replica: loads the engine, then Serve calls `__serve_build_asgi_app__` for the app it serves."""

    def __init__(self, model_dir: str, engine: str, device: str | None, threads: int, app_options: dict):
        from sprm_kernels.model.engines.registry import load_engine
        from sprm_kernels.model.ray.cluster import keep_replica_on_loopback, set_torch_threads

        keep_replica_on_loopback()
        set_torch_threads(threads)
        self.engine = load_engine(model_dir, engine=engine, device=device)
        self.app_options = app_options

    def __serve_build_asgi_app__(self):
        from sprm_kernels.model.serving.app import create_app

        return create_app(self.engine, **self.app_options)


def deploy(
    model_dir: str,
    *,
    engine: str = "hf",
    device: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8001,
    options: ReplicaOptions | None = None,
    address: str | None = None,
    timeout: float = 300.0,
    **app_options,
) -> str:
    """Deploy the app (`app_options` go to `create_app`: max_batch_tokens, max_queue, max_text_tokens, token) as
    replicas behind Serve's proxy on host:port; returns the proxy's URL once every replica is up and the proxy
    answers. Serve's host and port are fixed when Serve first starts on a cluster (as `serve.start` does)."""
    from ray import serve

    from sprm_kernels.model.ray.cluster import check_model_dir, connect

    check_model_dir(model_dir)
    options = options or ReplicaOptions()
    connect(address)
    serve.start(http_options={"host": host, "port": port})
    if device is None:
        device = "cuda" if options.gpus_per_replica > 0 else "cpu"
    threads = max(1, int(options.cpus_per_replica))
    deployment = serve.deployment(serve.ingress()(Replica), name="SPRMServer").options(**options.deployment_options())
    app = deployment.bind(os.path.abspath(model_dir), engine, device, threads, app_options)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    _wait_for_proxy(url, timeout)
    return url


def _wait_for_proxy(url: str, timeout: float) -> None:
    """`serve.run` returns once the replicas are up; the HTTP proxy may still be starting: poll its health route
    (on the loopback address when it listens on every interface)."""
    import time
    import urllib.error
    import urllib.request

    probe = url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://127.0.0.1:") + "/-/healthz"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(probe, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray Serve's proxy did not answer on {probe} within {timeout:.0f} s")
        time.sleep(0.5)


def replica_actor_names() -> list[str]:
    """The Ray actor names of the app's running replicas (for tests and operators: `ray.kill` one to drill)."""
    import ray

    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::") and f"{APP_NAME}#SPRMServer#" in actor["name"]
    )


def undeploy() -> None:
    """Delete the app (other Serve apps on a shared cluster keep running)."""
    from ray import serve

    serve.delete(APP_NAME)


# -- the command line (`sprm serve --ray`) ---------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The options of `sprm serve` that only matter with --ray."""
    from sprm_kernels.model.ray.cluster import amount, count

    group = parser.add_argument_group("Ray Serve (see docs/ray.md)")
    group.add_argument(
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="serve replicas on Ray Serve: alone, a private Ray on 127.0.0.1; ADDRESS ('auto', HOST:PORT) joins one",
    )  # fmt: skip
    group.add_argument("--replicas", type=count, default=1, help="replicas, one engine each (default 1)")
    group.add_argument("--max-replicas", type=count, default=None, help="autoscale from --replicas up to this")
    group.add_argument("--target-ongoing-requests", type=amount, default=16.0, help="autoscaling aim per replica")
    group.add_argument("--max-ongoing-requests", type=count, default=64, help="requests one replica holds at once")
    group.add_argument("--cpus-per-replica", type=amount, default=1.0, help="CPUs per replica = its torch threads")
    group.add_argument("--gpus-per-replica", type=amount, default=0.0, help="GPUs per replica")


def options_from_args(args) -> ReplicaOptions:
    """ValueError naming the option for a bad combination."""
    try:
        return ReplicaOptions(
            replicas=args.replicas, max_replicas=args.max_replicas, max_ongoing_requests=args.max_ongoing_requests,
            target_ongoing_requests=args.target_ongoing_requests, cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
        )  # fmt: skip
    except ValueError as error:
        raise ValueError(f"--{str(error).replace('_', '-')}") from None


def run(args) -> int:
    """Deploy, print where, serve until SIGINT / SIGTERM, then shut Serve (and a private Ray) down."""
    import signal
    import threading

    options = options_from_args(args)
    app_options = dict(max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue,
                       max_text_tokens=args.max_text_tokens, token=args.token)  # fmt: skip
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    # before deploying (a signal while the replicas load stops the command) and again after: ray.init installs
    # its own SIGTERM handler, which would otherwise take over (and abort the process at exit)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        url = deploy(args.model, engine=args.engine, device=args.device, host=args.host, port=args.port,
                     options=options, address=args.ray, **app_options)  # fmt: skip
        for sig in signals:
            signal.signal(sig, lambda *_: stop.set())
        scaling = f"{options.replicas}..{options.max_replicas}" if options.max_replicas else str(options.replicas)
        print(f"sprm: serving {args.model} on {url} with {scaling} Ray Serve replicas; Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        import ray

        if ray.is_initialized():
            undeploy()
            ray.shutdown()  # stops a private Ray; leaves a joined cluster
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
