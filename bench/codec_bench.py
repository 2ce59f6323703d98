"""Codec benchmark on Llama-2-7B-shaped checkpoints (random fp16 weights of the real shapes).

Prints, in one run:
  * size ratio of the delta vs the fp16 fine-tuned checkpoint, BitDelta setting (embeddings and
    lm_head dense) and with embedding deltas binarized too — beside the paper's 10.87x anchor;
  * compress throughput (GB of fine-tuned weights per second) beside the throughput of merely
    reading and sha256-hashing the same two checkpoints (the limit);
  * apply throughput beside reading+hashing base and delta, and beside copying the base file.

`--layers N` builds N of the 32 decoder layers (each is written as its own shard, streamed,
so memory stays at about one layer); sizes are extrapolated to 32 layers exactly, since every
layer compresses to the same number of bytes. `--layers 32` builds the full 13.5 GB pair.

    python bench/codec_bench.py --layers 4 --workdir /tmp/bench7b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codec.apply import apply_delta  # noqa: E402
from codec.compress import CompressOptions, compress  # noqa: E402
from codec.format import DeltaFile  # noqa: E402

HIDDEN, INTER, VOCAB, LAYERS = 4096, 11008, 32000, 32
PAPER_RATIO = 10.87


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
    }


def outer_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }


def build_pair(root: Path, layers: int) -> tuple[Path, Path]:
    """Write base and fine-tune as HF sharded checkpoints, one shard per layer (streaming)."""
    base_dir, ft_dir = root / "base", root / "finetuned"
    marker = root / f"built-{layers}.json"
    if marker.exists():
        return base_dir, ft_dir
    shutil.rmtree(root, ignore_errors=True)
    base_dir.mkdir(parents=True)
    ft_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    groups = [outer_shapes()] + [layer_shapes(i) for i in range(layers)]
    weight_map = {}
    for g, shapes in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        base, ft = {}, {}
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=gen) * 0.02
            # A fine-tune's delta is small next to the weight (~1e-3 relative std).
            d = torch.randn(shape, generator=gen) * 2e-5
            base[name], ft[name] = w.half(), (w + d).half()
            weight_map[name] = fname
        save_file(base, base_dir / fname)
        save_file(ft, ft_dir / fname)
        del base, ft
    for d in (base_dir, ft_dir):
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
        (d / "config.json").write_text(
            json.dumps(
                {
                    "architectures": ["LlamaForCausalLM"],
                    "model_type": "llama",
                    "hidden_size": HIDDEN,
                    "intermediate_size": INTER,
                    "num_hidden_layers": layers,
                    "vocab_size": VOCAB,
                    "torch_dtype": "float16",
                }
            )
        )
    marker.write_text("{}")
    return base_dir, ft_dir


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def read_and_hash(*dirs_or_files: Path) -> float:
    """Seconds to read every byte of the given checkpoints/files and sha256 them."""
    start = time.perf_counter()
    for item in dirs_or_files:
        files = sorted(item.glob("*.safetensors")) if item.is_dir() else [item]
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while buf := fh.read(16 << 20):
                    h.update(buf)
    return time.perf_counter() - start


def copy_files(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    start = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fi, open(dst / f.name, "wb") as fo:
            shutil.copyfileobj(fi, fo, 16 << 20)
            fo.flush()
            os.fsync(fo.fileno())
    return time.perf_counter() - start


def best_of(n: int, fn) -> float:
    return min(fn() for _ in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/deltastore-bench-7b"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()

    t = time.perf_counter()
    base_dir, ft_dir = build_pair(args.workdir, args.layers)
    print(
        f"# Llama-2-7B-shaped fp16 pair with {args.layers}/{LAYERS} layers at {args.workdir} "
        f"(built in {time.perf_counter() - t:.0f}s); torch threads={torch.get_num_threads()}"
    )
    ft_bytes = dir_bytes(ft_dir)

    # --- size ratios -------------------------------------------------------------------------
    rows = []
    for label, opts in (
        ("BitDelta setting (embed/lm_head dense)", CompressOptions()),
        ("embed + lm_head binarized too", CompressOptions(include=("*embed_tokens*", "*lm_head*"))),
    ):
        out = args.workdir / "delta.bdelta"
        report = compress(base_dir, ft_dir, out, opts)
        delta = DeltaFile.open(out)
        per_layer = sum(e.nbytes for n, e in delta.entries.items() if n.startswith("model.layers.0."))
        outer = sum(e.nbytes for n, e in delta.entries.items() if not n.startswith("model.layers."))
        header = report.delta_bytes - sum(e.nbytes for e in delta.entries.values())
        ft_layer = sum(2 * torch.Size(s).numel() for s in layer_shapes(0).values())
        ft_outer = sum(2 * torch.Size(s).numel() for s in outer_shapes().values())
        full_ft = ft_outer + LAYERS * ft_layer
        full_delta = outer + LAYERS * per_layer + header
        rows.append((label, report.ratio, full_ft / full_delta, full_delta))
    print()
    print(
        "| variant | ratio (measured, this file) | ratio (32 layers, 7B) | delta size (7B) | paper anchor |"
    )
    print("|---|---|---|---|---|")
    for label, measured, full, size in rows:
        print(f"| {label} | {measured:.2f}x | {full:.2f}x | {size / 1e9:.2f} GB | {PAPER_RATIO}x |")

    # --- compress throughput ---------------------------------------------------------------------
    out = args.workdir / "delta.bdelta"
    limit = best_of(args.repeat, lambda: read_and_hash(base_dir, ft_dir))
    comp = best_of(args.repeat, lambda: _timed(lambda: compress(base_dir, ft_dir, out)))
    limit = min(limit, read_and_hash(base_dir, ft_dir))
    gb = ft_bytes / 1e9
    print()
    print("| operation | ours GB/s | limit GB/s | ours / limit |")
    print("|---|---|---|---|")
    print(
        f"| compress ({gb:.2f} GB fine-tune) | {gb / comp:.2f} | "
        f"{gb / limit:.2f} (read+sha256 base+fine-tune) | {limit / comp:.2f} |"
    )

    # --- apply throughput ------------------------------------------------------------------------
    applied = args.workdir / "applied"

    def run_apply():
        shutil.rmtree(applied, ignore_errors=True)
        return _timed(lambda: apply_delta(base_dir, out, applied))

    app = best_of(args.repeat, run_apply)
    limit_read = best_of(args.repeat, lambda: read_and_hash(base_dir, out))
    limit_copy = best_of(args.repeat, lambda: copy_files(base_dir, args.workdir / "copy"))
    print(
        f"| apply ({gb:.2f} GB written) | {gb / app:.2f} | {gb / limit_read:.2f} "
        f"(read+sha256 base+delta) | {limit_read / app:.2f} |"
    )
    print(
        f"| apply vs copying the base | {gb / app:.2f} | {gb / limit_copy:.2f} "
        f"(read+write+fsync base) | {limit_copy / app:.2f} |"
    )
    shutil.rmtree(args.workdir / "copy", ignore_errors=True)
    shutil.rmtree(applied, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
