"""`deltactl serve-model`: the OpenAI-compatible inference server on one base model, its deltas
pulled from a registry on demand. Wiring only: the engine and app live in gpu_loader.serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from codec.errors import BaseMismatchError

from .console import err
from .errors import handle_errors

DTYPES = {"auto": None, "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def registry_base_name(api, fingerprint: str, base: Path) -> str:
    """The registry's name for the base with `fingerprint`; refuses (naming both sides) when the
    registry knows no such base."""
    bases = api.bases()
    for b in bases:
        if b.fingerprint == fingerprint:
            return b.name
    known = ", ".join(f"{b.name} ({b.fingerprint})" for b in bases) or "none"
    raise BaseMismatchError(
        f"the registry at {api.endpoint} knows no base with the fingerprint of {base} ({fingerprint}); "
        f"bases there: {known}. Register it with `deltactl base add NAME {base}`",
        expected=fingerprint,
        actual=known,
    )


@handle_errors
def serve_model_cmd(
    ctx: typer.Context,
    base: Annotated[
        Path,
        typer.Argument(help="The base: a local Hugging Face model directory, or a Hub id (org/name[@rev])."),
    ],
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="Registry URL deltas are pulled from (refs namespace/name[:tag|@N]); "
            "default: none (only the base, and --allow-paths files).",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cuda or cpu (default: cuda if present).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")] = "auto",
    max_slots: Annotated[int, typer.Option("--max-slots", min=1, help="Most deltas resident at once.")] = 16,
    memory_budget: Annotated[
        str, typer.Option("--memory-budget", help="Device memory for delta slots.")
    ] = "4GiB",
    max_planes: Annotated[
        int, typer.Option("--max-planes", min=1, help="Most sign planes a served delta may have.")
    ] = 1,
    max_rank: Annotated[
        int,
        typer.Option(
            "--max-rank",
            min=0,
            help="Highest low-rank factor rank a served delta may have (lowrank-mp, hybrid).",
        ),
    ] = 0,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Sequences per step.")] = 16,
    max_batch_tokens: Annotated[
        int, typer.Option("--max-batch-tokens", min=1, help="Tokens per step (decode + prefill chunks).")
    ] = 512,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Waiting requests before 429.")] = 256,
    max_per_tenant: Annotated[
        int | None,
        typer.Option(
            "--max-running-per-tenant", min=1, help="Running sequences per model (default: half the batch)."
        ),
    ] = None,
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule", help="auto (measured at start), mixed (slots) or grouped (merged weights)."
        ),
    ] = "auto",
    timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a request may take.")] = 600.0,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="The base's model id (default: the registry's name for it, else the directory name).",
        ),
    ] = None,
    allow_paths: Annotated[
        bool, typer.Option("--allow-paths", help="Let `model` name a local .bdelta file on this host.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="torch CPU threads (default: torch's; 1 on a shared machine)."),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="DELTASTORE_SERVE_API_KEY",
            help="Required as `Authorization: Bearer KEY` on /v1.",
        ),
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run --replicas copies on Ray Serve.")] = False,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="With --ray: replicas to run.")] = 1,
) -> None:
    """Serve BASE and its deltas over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models).

    Example: deltactl serve-model ./smollm2 --registry http://127.0.0.1:8000 --device cpu --port 8080
    """
    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}", param_hint="--dtype")
    if schedule not in ("auto", "mixed", "grouped"):
        raise typer.BadParameter("--schedule must be auto, mixed or grouped", param_hint="--schedule")
    if ray:
        from .ray_commands import serve_model_on_ray

        return serve_model_on_ray(ctx.params)
    import torch
    import uvicorn

    from codec.checkpoint import Checkpoint
    from codec.hub import resolve_model
    from gpu_loader import parse_size
    from gpu_loader.serving.app import build_serving, create_app
    from gpu_loader.serving.engine import EngineConfig

    parse_size(memory_budget)  # a bad size fails here, before the model loads
    if threads:
        torch.set_num_threads(threads)
    resolved = resolve_model(base)  # a Hub id becomes its snapshot directory in the Hub cache
    base = resolved.path
    fingerprint = Checkpoint.open(base).fingerprint()
    api = None
    if registry is not None:
        from registry.client.api import RegistryApi

        api = RegistryApi(registry)
        registry_name = registry_base_name(api, fingerprint, base)
        name = name or registry_name
    if name is None and resolved.source is not None:
        name = resolved.source.repo_id
    config = EngineConfig(
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_queue=max_queue,
        max_running_per_tenant=max_per_tenant,
        request_timeout=timeout,
        schedule=schedule,
    )
    torch_dtype = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    err.print(f"loading {base} ({fingerprint[:19]}…) on {device or 'the default device'}")
    serving = build_serving(
        base,
        base_name=name,
        device=device,
        dtype=torch_dtype,
        max_slots=max_slots,
        memory_budget=memory_budget,
        max_planes=max_planes,
        max_rank=max_rank,
        engine_config=config,
        registry_api=api,
        api_key=api_key,
        allow_paths=allow_paths,
        base_fingerprint=fingerprint,
    )
    planner = serving.engine.planner
    if planner.costs is not None:
        err.print(f"step costs measured at start: {planner.costs.as_dict()}")
    err.print(
        f"deltastore inference server for {serving.config.base_name!r} on http://{host}:{port}/v1"
        + (f" (deltas from {registry})" if registry else "")
    )
    uvicorn.run(create_app(serving), host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    app.command("serve-model")(serve_model_cmd)
