"""Upload headers as a memory and CPU amplifier (not a test): the registry's peak RSS while it
verifies uploads whose small zstd frames expand to a space-padded giant header, one at a time
and four at once, beside the header's own size; and the CPU verification spends on a frame of
4 GiB of zeros declared as a 4 GiB delta, beside what decompressing that frame costs.

    nice -n 10 python bench/reliability_headers.py
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zstandard  # noqa: E402

from codec.storage import decompress_stream  # noqa: E402
from registry.common.errors import InvalidUploadError  # noqa: E402
from registry.server.verify import Declared, verify_stream  # noqa: E402
from tests.reliability.test_security import PeakRss  # noqa: E402
from tests.reliability.test_zstd_bombs import padded  # noqa: E402
from tests.support.corpus import delta_bytes, sha256, storage_form  # noqa: E402
from tests.support.harness import RegistryProcess, migrate, setup_repo  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20


class _Null:
    def write(self, buf) -> int:
        return len(buf)


def _complete(url: str, blob) -> tuple[int, float]:
    import httpx

    with httpx.Client(base_url=url, timeout=600) as c:
        upload = c.post("/v1/repos/acme/math/uploads", json=blob.declaration()).json()
        assert c.put(upload["upload_url"], content=blob.data).status_code == 200
        started = time.perf_counter()
        status = c.post(upload["complete_url"]).status_code
        return status, time.perf_counter() - started


def memory_rows() -> list[tuple]:
    cases = [
        ("99 MB header", 99_000_000, 1),
        ("99 MB header x 4 at once", 99_000_000, 4),
        ("16 MiB - 4 KiB header (limit)", 16 * MiB - 4096, 1),
        ("16 MiB - 4 KiB x 4 at once", 16 * MiB - 4096, 4),
    ]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="ds-headers-"))
    env = {"DELTASTORE_DATA_DIR": str(work / "data")}
    migrate(env)
    with RegistryProcess(env, log_path=work / "server.log") as server:
        with server.client() as c:
            setup_repo(c, "acme/math")
        variant = 100
        for label, header_bytes, concurrent in cases:
            blobs = []
            for _ in range(concurrent):
                variant += 1
                blobs.append(storage_form(padded(delta_bytes(variant), header_bytes)))
            with PeakRss(server.pid) as rss, ThreadPoolExecutor(concurrent) as pool:
                answers = list(pool.map(lambda b: _complete(server.url, b), blobs))
            statuses = sorted({status for status, _ in answers})
            rows.append(
                (
                    label,
                    f"{blobs[0].size / 1e3:.0f} KB",
                    f"{header_bytes * concurrent / MiB:.0f} MiB",
                    f"+{rss.grew_mib:.1f} MiB",
                    "/".join(map(str, statuses)),
                    f"{max(s for _, s in answers):.2f}",
                )
            )
    return rows


def bomb_row() -> tuple:
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
    out = io.BytesIO()
    zero = bytes(MiB)
    with cctx.stream_writer(out, size=4 * GiB, closefd=False) as writer:
        for _ in range(4 * GiB // MiB):
            writer.write(zero)
    data = out.getvalue()
    declared = Declared(sha256(data), len(data), "sha256:" + "0" * 64, 4 * GiB)
    started = time.process_time()
    try:
        verify_stream(io.BytesIO(data), declared, max_size=len(data))
    except InvalidUploadError:
        pass
    refused = time.process_time() - started
    started = time.process_time()
    decompress_stream(io.BytesIO(data), _Null(), max_output_size=4 * GiB)
    whole = time.process_time() - started
    return (f"{len(data) / 1e3:.0f} KB", f"{refused:.3f}", f"{whole:.2f}")


def main() -> None:
    print("| upload | stored | headers in flight | server peak RSS | status | s (slowest) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in memory_rows():
        print("| " + " | ".join(row) + " |")
    print()
    stored, refused, whole = bomb_row()
    print(
        "| 4 GiB of zeros declared as a 4 GiB delta | stored | CPU s to refuse (ours) "
        "| CPU s to decompress it (the peer: what refusing at the end costs) |"
    )
    print("| --- | --- | --- | --- |")
    print(f"| verify_stream | {stored} | {refused} | {whole} |")


if __name__ == "__main__":
    main()
