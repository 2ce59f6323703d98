"""Which S3 features an endpoint really implements (not a test): each operation the registry's S3
blob store uses, and the per-part checksums a streamed push could lean on, tried for real.

    python bench/s3_features.py                  # moto and s3rver, side by side
    python bench/s3_features.py --endpoint http://127.0.0.1:4569 [--endpoint ...]

A feature is "yes" when the endpoint does what S3 does (stores and returns the right bytes, refuses
what S3 refuses), "ignored" when it accepts the request but not its meaning (a wrong checksum or
precondition let through), "no" when it answers with an error.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import logging
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.live_registry import moto_s3, s3rver_s3  # noqa: E402  (sets the test credentials)

MIB = 1 << 20


def _b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or type(exc).__name__


class Probe:
    """One endpoint, one fresh bucket; each check returns (verdict, detail)."""

    def __init__(self, endpoint: str):
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        # as the registry configures it: checksums only where an operation needs them
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 1},
            ),
        )
        self.bucket = f"probe-{uuid.uuid4().hex[:10]}"
        self.s3.create_bucket(Bucket=self.bucket)

    def _presign(self, method: str, key: str, **params) -> str:
        return self.s3.generate_presigned_url(
            method, Params={"Bucket": self.bucket, "Key": key, **params}, ExpiresIn=300
        )

    def _get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def _multipart(self, key: str, parts: list[bytes]) -> tuple[str, list[dict]]:
        mpu = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        done = []
        for i, body in enumerate(parts, 1):
            url = self._presign("upload_part", key, UploadId=mpu, PartNumber=i)
            r = httpx.put(url, content=body, timeout=60)
            r.raise_for_status()
            done.append({"PartNumber": i, "ETag": r.headers["etag"]})
        return mpu, done

    # --- the registry's operations ---------------------------------------------------------
    def presigned_put_get(self):
        data = uuid.uuid4().bytes * 4096
        r = httpx.put(self._presign("put_object", "p/put"), content=data, timeout=60)
        if r.status_code != 200:
            return "no", f"PUT {r.status_code}"
        got = httpx.get(self._presign("get_object", "p/put"), timeout=60)
        ranged = httpx.get(self._presign("get_object", "p/put"), headers={"Range": "bytes=10-19"}, timeout=60)
        ok = got.content == data and ranged.status_code == 206 and ranged.content == data[10:20]
        return ("yes" if ok else "no"), f"GET {got.status_code}, ranged GET {ranged.status_code}"

    def multipart_presigned(self):
        parts = [b"a" * (5 * MIB), b"b" * (5 * MIB), b"c" * 1000]
        mpu, done = self._multipart("p/mpu", parts)
        out = self.s3.complete_multipart_upload(
            Bucket=self.bucket, Key="p/mpu", UploadId=mpu, MultipartUpload={"Parts": done}
        )
        ok = self._get("p/mpu") == b"".join(parts)
        return ("yes" if ok else "no"), f"3 presigned parts; object ETag {out['ETag']}"

    def multipart_small_parts(self):
        # the registry's tests use tiny parts (moto is told 1 KiB); real S3 refuses parts < 5 MiB
        try:
            mpu, done = self._multipart("p/tiny", [b"x" * 2048, b"y" * 2048])
            self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key="p/tiny", UploadId=mpu, MultipartUpload={"Parts": done}
            )
        except Exception as exc:  # noqa: BLE001 - the verdict is the error code
            return "refused", _code(exc)
        return "accepted", "2 KiB parts complete (S3 refuses with EntityTooSmall)"

    def complete_checks_etags(self):
        mpu, done = self._multipart("p/etag", [b"a" * (5 * MIB), b"b" * 10])
        done[0]["ETag"] = '"' + "0" * 32 + '"'
        try:
            self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key="p/etag", UploadId=mpu, MultipartUpload={"Parts": done}
            )
        except Exception as exc:  # noqa: BLE001
            return "yes", f"wrong part ETag refused: {_code(exc)}"
        return "ignored", "completed with a wrong part ETag"

    def list_parts(self):
        mpu, _ = self._multipart("p/lp", [b"a" * (5 * MIB), b"b" * 10])
        try:
            parts = self.s3.list_parts(Bucket=self.bucket, Key="p/lp", UploadId=mpu).get("Parts", [])
        except Exception as exc:  # noqa: BLE001
            return "no", _code(exc)
        sizes = [(p["PartNumber"], p["Size"]) for p in parts]
        return ("yes" if sizes == [(1, 5 * MIB), (2, 10)] else "no"), f"parts {sizes}"

    def abort_multipart(self):
        mpu, _ = self._multipart("p/abort", [b"a" * 10])
        try:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key="p/abort", UploadId=mpu)
        except Exception as exc:  # noqa: BLE001
            return "no", _code(exc)
        return "yes", "AbortMultipartUpload 204"

    def list_multipart_uploads(self):
        self._multipart("p/lmu", [b"a" * 10])
        try:
            ups = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix="p/").get("Uploads", [])
        except Exception as exc:  # noqa: BLE001
            return "no", _code(exc)
        return ("yes" if any(u["Key"] == "p/lmu" for u in ups) else "no"), f"{len(ups)} upload(s) listed"

    def copy_if_match(self):
        self.s3.put_object(Bucket=self.bucket, Key="p/src", Body=b"source")
        etag = self.s3.head_object(Bucket=self.bucket, Key="p/src")["ETag"]
        src = {"Bucket": self.bucket, "Key": "p/src"}
        try:
            self.s3.copy_object(Bucket=self.bucket, Key="p/dst", CopySource=src, CopySourceIfMatch=etag)
        except Exception as exc:  # noqa: BLE001
            return "no", f"CopyObject: {_code(exc)}"
        try:
            self.s3.copy_object(
                Bucket=self.bucket, Key="p/dst2", CopySource=src, CopySourceIfMatch='"' + "0" * 32 + '"'
            )
        except Exception as exc:  # noqa: BLE001
            return "yes", f"copy; stale If-Match refused: {_code(exc)}"
        return "ignored", "copy works; a stale CopySourceIfMatch is copied anyway"

    def list_head_delete(self):
        self.s3.put_object(Bucket=self.bucket, Key="p/del", Body=b"x")
        listed = [
            o["Key"] for o in self.s3.list_objects_v2(Bucket=self.bucket, Prefix="p/d").get("Contents", [])
        ]
        self.s3.head_bucket(Bucket=self.bucket)
        self.s3.delete_object(Bucket=self.bucket, Key="p/del")
        try:
            self.s3.head_object(Bucket=self.bucket, Key="p/del")
        except Exception as exc:  # noqa: BLE001
            gone = _code(exc) in {"404", "NoSuchKey", "NotFound"}
            return ("yes" if "p/del" in listed and gone else "no"), f"listed {listed}, then {_code(exc)}"
        return "no", "object still there after DeleteObject"

    def expired_presigned(self):
        url = self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": "p/put"}, ExpiresIn=-10
        )
        r = httpx.get(url, timeout=30)
        return ("yes" if r.status_code == 403 else "ignored"), f"expired URL answered {r.status_code}"

    # --- checksums (what a streamed, per-part-verified push could use) ---------------------
    def checksum_stored(self):
        data = b"checksummed" * 1000
        self.s3.put_object(Bucket=self.bucket, Key="p/ck", Body=data, ChecksumAlgorithm="SHA256")
        stored = self.s3.head_object(Bucket=self.bucket, Key="p/ck", ChecksumMode="ENABLED").get(
            "ChecksumSHA256"
        )
        mpu = self.s3.create_multipart_upload(Bucket=self.bucket, Key="p/ckm", ChecksumAlgorithm="SHA256")
        part = self.s3.upload_part(
            Bucket=self.bucket,
            Key="p/ckm",
            UploadId=mpu["UploadId"],
            PartNumber=1,
            Body=data,
            ChecksumAlgorithm="SHA256",
        )
        ok = stored == _b64sha256(data) and part.get("ChecksumSHA256") == _b64sha256(data)
        return ("yes" if ok else "no"), f"HeadObject {stored!r}, UploadPart {part.get('ChecksumSHA256')!r}"

    def put_wrong_checksum(self):
        data = b"checksummed" * 1000
        try:
            self.s3.put_object(
                Bucket=self.bucket, Key="p/ck2", Body=data, ChecksumSHA256=_b64sha256(b"other")
            )
        except Exception as exc:  # noqa: BLE001
            return "yes", f"refused: {_code(exc)}"
        return "ignored", "stored anyway"

    def part_wrong_checksum(self):
        key = "p/ckpart"
        mpu = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256")[
            "UploadId"
        ]
        wrong = _b64sha256(b"other")
        # presigned with the checksum signed in: the uploader must send exactly that header
        url = self._presign("upload_part", key, UploadId=mpu, PartNumber=1, ChecksumSHA256=wrong)
        r = httpx.put(url, content=b"z" * (5 * MIB), headers={"x-amz-checksum-sha256": wrong}, timeout=60)
        if r.status_code == 200:
            return "ignored", "accepted"
        return "yes", f"refused: {r.status_code}"

    def content_md5(self):
        wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        try:
            self.s3.put_object(Bucket=self.bucket, Key="p/md5", Body=b"data", ContentMD5=wrong)
        except Exception as exc:  # noqa: BLE001
            return "yes", f"refused: {_code(exc)}"
        return "ignored", "stored anyway"


CHECKS: list[tuple[str, Callable[[Probe], tuple[str, str]]]] = [
    ("presigned PUT, GET, ranged GET", Probe.presigned_put_get),
    ("multipart: create, presigned UploadPart, complete", Probe.multipart_presigned),
    ("multipart: parts under 5 MiB", Probe.multipart_small_parts),
    ("complete checks the part ETags", Probe.complete_checks_etags),
    ("ListParts (resume)", Probe.list_parts),
    ("AbortMultipartUpload (gc)", Probe.abort_multipart),
    ("ListMultipartUploads (gc)", Probe.list_multipart_uploads),
    ("CopyObject + CopySourceIfMatch (promote)", Probe.copy_if_match),
    ("ListObjectsV2, HeadBucket, DeleteObject", Probe.list_head_delete),
    ("expired presigned URL refused", Probe.expired_presigned),
    ("SHA-256 checksum kept (PutObject, UploadPart)", Probe.checksum_stored),
    ("wrong x-amz-checksum-sha256 on PutObject refused", Probe.put_wrong_checksum),
    ("wrong signed checksum on presigned UploadPart refused", Probe.part_wrong_checksum),
    ("wrong Content-MD5 refused", Probe.content_md5),
]


def probe(endpoint: str) -> dict[str, tuple[str, str]]:
    """Every check against `endpoint`: {feature: (verdict, detail)}; an unexpected failure of a
    check's set-up counts as "no" with its error code."""
    p = Probe(endpoint)
    out = {}
    for name, check in CHECKS:
        try:
            out[name] = check(p)
        except Exception as exc:  # noqa: BLE001
            out[name] = ("no", f"{_code(exc)}: {str(exc)[:80]}")
    return out


def print_table(results: dict[str, dict[str, tuple[str, str]]]) -> None:
    names = list(results)
    print("| feature | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for feature, _ in CHECKS:
        cells = [f"{results[n][feature][0]} ({results[n][feature][1]})" for n in names]
        print(f"| {feature} | " + " | ".join(cells) + " |")


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoint", action="append", help="probe this endpoint instead of moto and s3rver")
    args = parser.parse_args()
    results: dict[str, dict[str, tuple[str, str]]] = {}
    if args.endpoint:
        for e in args.endpoint:
            results[e] = probe(e)
    else:
        for name, server in (("moto", moto_s3), ("s3rver", s3rver_s3)):
            with contextlib.ExitStack() as stack:
                results[name] = probe(stack.enter_context(server()))
    print_table(results)


if __name__ == "__main__":
    main()
