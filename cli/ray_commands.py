"""`deltactl serve-model BASE --ray --replicas N`: the inference server as a Ray Serve application on
a local Ray cluster (or the one RAY_ADDRESS names). The deployment itself is gpu_loader.ray_serve."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .console import err
from .errors import EXIT_ERROR, EXIT_USAGE, fail

APP_NAME = "deltastore"


def serve_args(params: dict):
    """`serve-model`'s parsed options -> `ServeArgs`, after the checks the single-node command makes
    before any model loads (the checkpoint, the memory size, the registry knowing this base)."""
    from codec.checkpoint import Checkpoint
    from gpu_loader import parse_size
    from gpu_loader.ray_serve import ServeArgs

    from .serve_model_commands import DTYPES, registry_base_name

    base = Path(params["base"]).resolve()
    parse_size(params["memory_budget"])
    fingerprint = Checkpoint.open(base).fingerprint()
    name = params["name"]
    if params["registry"] is not None:
        from registry.client.api import RegistryApi

        with RegistryApi(params["registry"]) as api:
            name = name or registry_base_name(api, fingerprint, base)
    return ServeArgs(
        base=str(base),
        base_name=name,
        base_fingerprint=fingerprint,
        replicas=params["replicas"],
        registry=params["registry"],
        device=params["device"],
        dtype=DTYPES[params["dtype"]],
        max_slots=params["max_slots"],
        memory_budget=params["memory_budget"],
        max_planes=params["max_planes"],
        max_rank=params["max_rank"],
        max_batch_size=params["max_batch_size"],
        max_batch_tokens=params["max_batch_tokens"],
        max_queue=params["max_queue"],
        max_running_per_tenant=params["max_per_tenant"],
        request_timeout=params["timeout"],
        schedule=params["schedule"],
        api_key=params["api_key"],
        allow_paths=params["allow_paths"],
        threads=params.get("threads"),
    )


def serve_model_on_ray(params: dict) -> None:
    """`serve-model --ray` with the command's parsed options: deploy `gpu_loader.ray_serve.build_app`
    behind Serve's HTTP proxy on --host/--port and block until interrupted. A cluster this command
    started is shut down on exit; on an existing one (RAY_ADDRESS) only this application is deleted."""
    try:
        import ray
        from ray import serve

        from gpu_loader.ray_serve import build_app
    except ImportError as exc:
        fail(f"usage: Ray Serve is not installed ({exc}); pip install 'deltastore[ray]'", EXIT_USAGE)
    args = serve_args(params)
    host, port = params["host"], params["port"]
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica could not start: Ray's status says why
            fail(f"Ray Serve: {exc} {_replica_failure(serve)}".strip(), EXIT_ERROR)
        err.print(
            f"deltastore inference server on Ray Serve at http://{host}:{port}/v1: {args.replicas} "
            f"replica(s) of {args.resolved_base_name!r}, up to {args.max_slots} resident deltas each"
            + (f", deltas from {args.registry}" if args.registry else "")
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        err.print("stopping")
    finally:
        if address is None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()


def _replica_failure(serve) -> str:
    """The last line of the replica deployment's failure message (the exception it raised)."""
    try:
        deployment = serve.status().applications[APP_NAME].deployments["DeltaReplica"]
    except Exception:
        return ""
    lines = [line for line in (deployment.message or "").splitlines() if line.strip()]
    return f"({lines[-1].strip()})" if lines else ""
