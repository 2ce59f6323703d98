"""`deltactl demo`: the whole product on a real small model pair, narrated.

Builds (once, cached) SmolLM2-135M-Instruct as the base and a short real fine-tune of it on
Python sources, compresses the fine-tune to a 1-bit delta, inspects it, applies it, and
reports sizes, reconstruction error and how much of the fine-tune's loss gain survived. Then
the registry: `deltactl serve` (SQLite + local blob store) in the background on a free loopback
port, the base registered, the delta pushed (its measured fidelity with it) and pushed again
(deduplicated), listed, pulled into a fresh cache, checked byte for byte against the pushed
file and loaded against the base. Last, `deltactl serve-model` on the base with the registry
behind it answers chat requests for two pushed deltas and the base at once; servers are stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from .console import err, human_bytes, out
from .errors import handle_errors

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = "demo/python-stdlib"


def _say(step: str) -> None:
    err.print(f"[bold cyan]==>[/] {step}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _child_server(
    what: str, args: list[str], env: dict, log_path: Path, *, ready_within: float, stop_within: float
) -> Iterator[str]:
    """`deltactl ARGS --port P` in a child process on a free loopback port (its output in
    `log_path`); yields its URL once /readyz answers 200, and stops it after."""
    import httpx

    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *args, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {what} did not start; see {log_path}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _server_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("DELTASTORE_")}


@contextlib.contextmanager
def background_registry(data_dir: Path, log_path: Path) -> Iterator[str]:
    """`deltactl serve` on the embedded default (SQLite + local blobs under `data_dir`) in a
    child process on a free loopback port; yields its URL once it is ready, stops it after."""
    with _child_server(
        "registry", ["serve", "--data-dir", str(data_dir)], _server_env(), log_path,
        ready_within=60, stop_within=20,
    ) as url:  # fmt: skip
        yield url


def registry_round_trip(
    workdir: Path, base_dir: Path, delta: Path, *, base_name: str = BASE_NAME, repo: str = REPO
) -> dict:
    """Serve a fresh registry under `workdir`, register the base, push `delta` (twice: the second
    is deduplicated), list and show it, pull it into a fresh cache, check it is the pushed file
    byte for byte and that it loads against the base. Returns the figures."""
    import filecmp

    from codec.checkpoint import Checkpoint
    from codec.files import sha256_file
    from codec.format import DeltaFile
    from registry.client.api import RegistryApi

    from .registry_commands import fidelity_summary

    started = time.perf_counter()
    workdir = workdir.resolve()
    for sub in ("registry", "push-home", "pull-home"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    (workdir / "registry").mkdir(parents=True)
    figures: dict = {}
    with background_registry(workdir / "registry", workdir / "registry" / "serve.log") as url:
        _say(
            f"deltactl serve --port {url.rsplit(':', 1)[1]} --data-dir "
            f"{workdir / 'registry'}   (background: SQLite + local blob store)"
        )
        with RegistryApi(url, home=workdir / "push-home") as api:
            _say(f"deltactl base add {base_name} {base_dir}")
            base, _ = api.register_base_from_checkpoint(base_name, base_dir)
            out.print(
                f"    registered {base.name}: {base.architecture}, "
                f"{base.parameter_count / 1e6:.1f}M parameters, {base.fingerprint[:19]}…"
            )

            _say(f"deltactl push {delta.name} {repo} --tag demo")
            pushed = api.push(
                delta,
                repo,
                tags=["demo"],
                description="SmolLM2-135M-Instruct fine-tuned on Python stdlib sources",
            )
            v = pushed.version
            out.print(
                f"    {v.repository}@{v.number}: {human_bytes(pushed.sent_bytes)} "
                f"sent in {pushed.seconds:.1f}s, "
                f"digest {v.digest[:19]}…, fidelity recorded: {fidelity_summary(v.fidelity)}"
            )
            _say(f"deltactl push {delta.name} {repo}   (the same bytes again)")
            again = api.push(delta, repo)
            out.print(
                f"    {again.version.repository}@{again.version.number}: "
                f"{'deduplicated, ' if again.deduplicated else ''}{human_bytes(again.sent_bytes)} "
                f"sent in {again.seconds:.2f}s"
            )

            _say("deltactl list")
            for r in api.repos():
                out.print(
                    f"    {r.full_name}  base {r.base}  {r.latest.codec} v{r.latest.number}  "
                    f"{human_bytes(r.latest.size)} stored  ratio {r.latest.size_ratio:.2f}x"
                )
            _say(f"deltactl show {repo}:demo")
            shown = api.version(f"{repo}:demo")
            out.print(
                f"    v{shown.number} tags {', '.join(shown.tags)}; {shown.codec}, {shown.dtype}; "
                f"{human_bytes(shown.size)} stored, {human_bytes(shown.raw_size)} decompressed"
            )

        _say(f"deltactl pull {repo}:demo   (into a fresh cache: {workdir / 'pull-home'})")
        with RegistryApi(url, home=workdir / "pull-home") as api:
            pulled = api.pull(f"{repo}:demo")
            out.print(
                f"    downloaded {human_bytes(pulled.downloaded_bytes)} "
                f"in {pulled.seconds:.2f}s -> {pulled.path}"
            )
            hit = api.pull(f"{repo}:demo")
            out.print(
                "    pulled again: "
                f"{'cache hit, nothing downloaded' if hit.cache_hit else 'downloaded again'} "
                f"({hit.seconds * 1000:.0f} ms)"
            )
        _say("stopping the registry")

    _say("checking the pulled delta against the pushed one and loading it against the base")
    identical = filecmp.cmp(delta, pulled.blob, shallow=False)
    base_ckpt = Checkpoint.open(base_dir)
    with DeltaFile.open(pulled.path) as loaded:
        specs = {n: (base_ckpt.entry(n).dtype, tuple(base_ckpt.entry(n).shape)) for n in base_ckpt.names}
        loaded.check_base(specs, base_ckpt.fingerprint())
        figures["loaded_tensors"] = len(loaded.entries)
    figures.update(
        url=url,
        version=pulled.version.number,
        digest=pulled.version.digest,
        raw_digest=sha256_file(pulled.blob),
        stored_bytes=pulled.version.size,
        delta_bytes=pulled.version.raw_size,
        push_seconds=pushed.seconds,
        dedup=again.deduplicated,
        dedup_seconds=again.seconds,
        pull_seconds=pulled.seconds,
        cache_hit=hit.cache_hit,
        identical=identical and sha256_file(delta) == pulled.version.raw_digest,
        pulled_path=str(pulled.path),
        seconds=time.perf_counter() - started,
    )
    return figures


SERVE_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "Show how to read a JSON file in Python.",
    "Write a Python function that returns the n-th Fibonacci number.",
)


@contextlib.contextmanager
def background_inference_server(base_dir: Path, registry: str, home: Path, log_path: Path) -> Iterator[str]:
    """`deltactl serve-model` on the demo's base in a child process on a free loopback port;
    yields its URL once /readyz answers, stops it after."""
    args = [
        "serve-model", str(base_dir), "--registry", registry, "--device", "cpu", "--dtype", "float32",
        "--threads", "1", "--max-slots", "4", "--memory-budget", "1GiB",
    ]  # fmt: skip
    env = {**_server_env(), "DELTACTL_HOME": str(home)}
    # loading and timing the base is slow on a shared CPU
    with _child_server("inference server", args, env, log_path, ready_within=900, stop_within=30) as url:
        yield url


def serving_round_trip(
    workdir: Path, base_dir: Path, second_delta: Path, *, base_name: str = BASE_NAME, repo: str = REPO
) -> list[dict]:
    """After `registry_round_trip` (which pushed `repo`): push a second delta as `repo`-embed,
    start the inference server on the base with the registry behind it, and ask the two deltas and
    the base at once over the OpenAI API; returns each answer."""
    import concurrent.futures

    import httpx

    from registry.client.api import RegistryApi

    with background_registry(workdir / "registry", workdir / "registry.log") as registry:
        second = f"{repo}-embed"
        _say(f"deltactl push {second_delta.name} {second}")
        with RegistryApi(registry, home=workdir / "push-home") as api:
            api.push(second_delta, second, tags=["demo"])
        serve_home = workdir / "serve-home"
        shutil.rmtree(serve_home, ignore_errors=True)
        _say(f"deltactl serve-model {base_dir.name} --registry {registry} --device cpu   (OpenAI API)")
        with background_inference_server(base_dir, registry, serve_home, workdir / "serve-model.log") as url:

            def ask(model: str, prompt: str) -> dict:
                started = time.perf_counter()
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 48,
                    "temperature": 0,
                }
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
                r.raise_for_status()
                data = r.json()
                return {
                    "model": model,
                    "prompt": prompt,
                    "answer": data["choices"][0]["message"]["content"],
                    "tokens": data["usage"]["completion_tokens"],
                    "seconds": time.perf_counter() - started,
                }

            _say(f"POST {url}/v1/chat/completions  x3 at once: two deltas (pulled on first use) and the base")
            models = (repo, second, base_name)
            with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
                answers = list(pool.map(ask, models, SERVE_PROMPTS))
            listed = httpx.get(url + "/v1/models", timeout=60).json()["data"]
            resident = [m["id"] for m in listed if m.get("resident")]
            for a in answers:
                a["resident_after"] = resident
    return answers


@handle_errors
def demo_cmd(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Where the model pair and outputs are kept.")
    ] = Path(".data/demo"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Fine-tuning steps for the demo pair.")] = 12,
) -> None:
    """Run the whole product on a real small model pair (SmolLM2-135M + a Python fine-tune).

    The codec (compress, inspect, apply, fidelity), then the registry: serve, base add, push,
    list, pull into a fresh cache, check and load; then the inference server on the base answers
    two pushed deltas and the base at once over the OpenAI API.
    """
    import torch

    from codec.apply import apply_delta
    from codec.checkpoint import Checkpoint
    from codec.compress import CompressOptions, compress
    from codec.summary import summarize
    from eval import pair

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    _say(f"base model: SmolLM2-135M-Instruct -> {workdir / 'base'}")
    base_dir = pair.build_base(workdir / "base", log=lambda m: err.print(f"    {m}"))
    recipe = pair.Recipe(steps=steps, batch=4, seq_len=128, lr=1e-4)
    _say(
        f"fine-tune: {recipe.steps} full AdamW steps on Python "
        f"stdlib sources (batch {recipe.batch}×{recipe.seq_len})"
    )
    ft_dir = pair.finetune(
        base_dir, workdir / f"finetuned-{steps}", recipe, log=lambda m: err.print(f"    {m}")
    )

    outputs = {}
    for label, options in (
        ("paper setting (embeddings dense)", CompressOptions(base_name=BASE_NAME)),
        ("embeddings binarized too", CompressOptions(base_name=BASE_NAME, include=("*embed_tokens*",))),
    ):
        path = workdir / ("delta.bdelta" if not outputs else "delta-embed.bdelta")
        _say(f"deltactl compress  ({label}) -> {path.name}")
        start = time.perf_counter()
        report = compress(base_dir, ft_dir, path, options)
        outputs[label] = (path, report, time.perf_counter() - start)

    path, report, seconds = outputs["paper setting (embeddings dense)"]
    _say(f"deltactl inspect {path.name}")
    info = summarize(path)
    out.print(
        f"    codec={info['codec']} base={info['base_model']} dtype={info['dtype']} "
        f"{info['counts']['bitdelta']} binarized / {info['counts']['full']} dense tensors, "
        f"{info['bits_per_binarized_weight']:.3f} bits per binarized weight"
    )
    applied = workdir / "applied"
    _say(f"deltactl apply base {path.name} -> {applied}")
    shutil.rmtree(applied, ignore_errors=True)
    apply_delta(base_dir, path, applied)

    _say("measuring reconstruction error and held-out loss (fp32)")
    base, ft, rec = (Checkpoint.open(d) for d in (base_dir, ft_dir, applied))
    num = den = 0.0
    for name in report.binarized:
        f = ft.get(name).float()
        num += float((rec.get(name).float() - f).pow(2).sum())
        den += float((f - base.get(name).float()).pow(2).sum())
    losses = {
        label: pair.heldout_loss(d)
        for label, d in (("base", base_dir), ("fine-tuned", ft_dir), ("1-bit delta", applied))
    }
    gain = losses["base"] - losses["fine-tuned"]

    from eval.fidelity import write_fidelity

    _say(f"recording the measured fidelity in {path.name} (metadata 'fidelity', read by push and show)")
    write_fidelity(
        path,
        {
            "eval": "python stdlib held-out split, next-token loss",
            "loss_base": losses["base"],
            "loss_finetuned": losses["fine-tuned"],
            "loss": losses["1-bit delta"],
            **({"gain_recovered": (losses["base"] - losses["1-bit delta"]) / gain} if gain > 0 else {}),
        },
    )
    registry = registry_round_trip(workdir, base_dir, path)
    answers = serving_round_trip(workdir, base_dir, outputs["embeddings binarized too"][0])

    out.print()
    out.print("[bold]result[/]")
    for label, (_path, r, s) in outputs.items():
        out.print(
            f"    {label:34s} {human_bytes(r.delta_bytes):>10}  ratio {r.ratio:5.2f}x vs the "
            f"{human_bytes(r.finetuned_bytes)} fp16 fine-tune  (compressed in {s:.1f}s)"
        )
    out.print(f"    relative error of binarized weights ‖Ŵ−W_ft‖/‖W_ft−W_base‖ = {(num / den) ** 0.5:.3f}")
    for label, value in losses.items():
        out.print(f"    held-out loss  {label:12s} {value:.4f}")
    if gain > 0:
        out.print(
            "    fine-tune gain recovered by the 1-bit delta: "
            f"{100 * (losses['base'] - losses['1-bit delta']) / gain:.1f}%"
        )
    out.print(
        f"    registry: fp16 fine-tune {human_bytes(report.finetuned_bytes)} "
        f"-> delta {human_bytes(registry['delta_bytes'])} "
        f"-> stored {human_bytes(registry['stored_bytes'])} "
        f"(zstd); the registry part took {registry['seconds']:.0f}s"
    )
    out.print(
        f"        push {registry['push_seconds']:.1f}s; the same bytes again "
        f"{'deduplicated' if registry['dedup'] else 'NOT deduplicated'} in {registry['dedup_seconds']:.2f}s; "
        f"pull into a fresh cache {registry['pull_seconds']:.1f}s; second pull "
        f"{'a cache hit' if registry['cache_hit'] else 'NOT a cache hit'}"
    )
    verdict = "byte-identical to" if registry["identical"] else "DIFFERENT FROM"
    out.print(
        f"        pulled delta {verdict} the pushed one ({registry['raw_digest']}), "
        f"loads against the base ({registry['loaded_tensors']} tensors)"
    )
    out.print("    inference server (one base + deltas from the registry, OpenAI API, one batch):")
    for a in answers:
        answer = " ".join(a["answer"].split())
        out.print(f"      [bold]{a['model']}[/] ({a['tokens']} tokens, {a['seconds']:.1f}s): {answer[:160]}")
    out.print(f"    total {time.perf_counter() - t0:.0f}s; everything is under {workdir}")
    del torch
    if not registry["identical"]:
        raise typer.Exit(1)
