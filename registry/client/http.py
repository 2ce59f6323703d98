"""The client's one HTTP layer: the single place that turns a response into an exception
(`api_error`), the one retry policy (`retrying`, on tenacity) and the connection to a registry and
its blob store (`RegistryHttp`), whose failures name the server that failed.

    http = RegistryHttp("http://127.0.0.1:8000", token=None, upload_concurrency=10, unavailable_max_wait=10)
    body = http.request("GET", "/v1/repos").json()      # a 503 with Retry-After is waited out (GETs only)
    response = http.blob_gets.get(presigned_url, {"Range": "bytes=100-"})   # urllib3, body unread

httpx carries every request but one: the blob store's presigned GET of a download goes through
urllib3 (`BlobGets`), whose 1 MiB body reads (http.client filling one buffer) cost far less CPU
than httpx's 64 KiB h11 events. In the pull's pipeline (network, hashing, two file writes and
zstd on two threads sharing the GIL) a 200 MB download from s3rver took 1.05 s and 0.52 s of CPU
through urllib3 against 1.85 s and 1.26 s through httpx (bench/pull_stages.py, RESULTS-client.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import math
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import tenacity
import urllib3

from codec import __version__
from codec.errors import DeltaStoreError
from registry.client import settings
from registry.client.errors import (
    BlobStoreUnreachableError,
    NetworkError,
    RegistryUnavailableError,
    RegistryUnreachableError,
)
from registry.common.errors import (
    AuthenticationError,
    BaseMismatchUploadError,
    BlobStoreError,
    ConflictError,
    DatabaseUnavailableError,
    DigestMismatchError,
    InvalidNameError,
    InvalidRequestError,
    InvalidUploadError,
    NotFoundError,
    PermissionDeniedError,
    RegistryError,
    SchemaOutOfDateError,
    SizeMismatchError,
    StorageFullError,
    UploadTooLargeError,
)

T = TypeVar("T")

#: The API's error codes (docs/registry.md) and the classes they come back as.
_ERROR_CLASSES: dict[str, type[RegistryError]] = {
    "invalid_request": InvalidRequestError,
    "invalid_name": InvalidNameError,
    "unauthenticated": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "base_mismatch": BaseMismatchUploadError,
    "too_large": UploadTooLargeError,
    "digest_mismatch": DigestMismatchError,
    "invalid_delta": InvalidUploadError,
    "blob_store_error": BlobStoreError,
    "schema_out_of_date": SchemaOutOfDateError,
    "database_unavailable": DatabaseUnavailableError,
    "insufficient_storage": StorageFullError,
    "size_mismatch": SizeMismatchError,
}
_STATUS_CLASSES: dict[int, type[RegistryError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: UploadTooLargeError,
    422: InvalidRequestError,
    507: StorageFullError,
}
#: Statuses a proxy or load balancer in front of the registry answers when the registry is not
#: there to answer (the registry's own 502 and 503 always carry its error body).
_GATEWAY_STATUSES = frozenset({502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Requests that may be sent again after a 503 with Retry-After (they change nothing).
_IDEMPOTENT = frozenset({"GET", "HEAD"})
#: Failures after which a request may be sent again: no connection, or one that broke before an
#: answer came (not a timeout: the registry may still be working on the first request).
CONNECTION_LOST = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
#: Answers of a blob store (or the registry's byte endpoints) that a repeated PUT may get past.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_SCHEMA_FIX = "deltactl db upgrade"


# --- the one retry policy -----------------------------------------------------------------------
def backoff(state: tenacity.RetryCallState) -> float:
    """0.2 s, 0.4 s, 0.8 s ... after the 1st, 2nd, 3rd failed attempt."""
    return 0.2 * 2 ** (state.attempt_number - 1)


def retrying(
    call: Callable[[], T],
    *,
    attempts: int,
    retry_on: Callable[[BaseException], bool] = lambda exc: False,
    retry_result: Callable[[T, tenacity.RetryCallState], bool] = lambda result, state: False,
    wait: Callable[[tenacity.RetryCallState], float] = backoff,
    before_retry: Callable[[tenacity.RetryCallState], None] | None = None,
) -> T:
    """`call()` until it succeeds, at most `attempts` times (the shape of huggingface_hub's
    `http_backoff`): an exception for which `retry_on` holds, or a result for which `retry_result`
    holds, is followed by a sleep of `wait(state)` and another attempt. After the last attempt the
    last result is returned or the last exception raised, as they are. `before_retry` runs before
    each sleep (to close an answer, take back progress)."""

    def should_retry(state: tenacity.RetryCallState) -> bool:
        outcome = state.outcome
        if outcome.failed:
            return retry_on(outcome.exception())
        return retry_result(outcome.result(), state)

    policy = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=wait,
        retry=should_retry,
        before_sleep=before_retry,
        retry_error_callback=lambda state: state.outcome.result(),  # the last answer, or raise its error
    )
    return policy(call)


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a `Retry-After` header asks to wait (a number of seconds or an HTTP date); None
    without a usable one."""
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


# --- the one place a response becomes an exception ----------------------------------------------
def api_error(response: httpx.Response) -> DeltaStoreError:
    """The registry's error answer as the exception class it was raised as on the server; a 502,
    503 or 504 without the registry's error body (a proxy's page) as RegistryUnavailableError."""
    code, message = None, None
    try:
        body = response.json()
        code, message = body["error"]["code"], body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    if not isinstance(code, str) or not isinstance(message, str):
        code, message = None, None
        if response.status_code in _GATEWAY_STATUSES:
            return _unavailable(response)
    cls = _ERROR_CLASSES.get(code or "") or _STATUS_CLASSES.get(response.status_code, RegistryError)
    message = (
        message or f"HTTP {response.status_code} from {response.request.method} {response.request.url.path}"
    )
    if cls is DatabaseUnavailableError:
        retry = response.headers.get("retry-after", "")
        when = f"in {retry} s" if retry.isdigit() else "shortly"
        message = (
            f"the registry at {origin(response)} cannot use its database right now: {message.rstrip('.')}. "
            f"Nothing was changed and nothing already stored is lost; retry {when}"
        )
    elif cls is SchemaOutOfDateError:
        fix = "done so" if _SCHEMA_FIX in message else f"run `{_SCHEMA_FIX}` on its database"
        message = (
            f"the registry at {origin(response)} cannot serve requests until its database schema is "
            f"upgraded: {message.rstrip('.')}. Nothing was changed; retrying fails the same way until the "
            f"registry's operator has {fix}"
        )
    elif cls is StorageFullError:
        message = (
            f"the registry at {origin(response)} is out of storage: {message.rstrip('.')}. Nothing already "
            "stored is lost; retry once space has been freed there (re-running a push resumes it)"
        )
    error = cls(message)
    if cls is RegistryError:
        error.status = response.status_code
    return error


def raise_for_status(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise api_error(response)
    return response


def _unavailable(response: httpx.Response) -> RegistryUnavailableError:
    request = response.request
    delay = retry_after(response)
    when = f"retry in {math.ceil(delay)} s" if delay is not None else "retry shortly"
    url = request.url.copy_with(query=None)
    error = RegistryUnavailableError(
        f"the registry at {origin(response)} is unavailable: {request.method} {url} "
        f"answered HTTP {response.status_code} {response.reason_phrase} without the registry's error body "
        f"(a proxy or load balancer in front of the registry answered for it); {when}"
    )
    error.status = response.status_code
    return error


def origin(response: httpx.Response) -> str:
    """`scheme://host:port` of the server that answered."""
    url = response.request.url
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def netloc(url: str) -> str:
    """`host:port` of a URL (a presigned one: its query, the signature, is left out)."""
    try:
        return httpx.URL(url).netloc.decode("ascii", "replace") or url[:80]
    except httpx.InvalidURL:
        return url[:80]


def s3_error(response: httpx.Response) -> str:
    """The `<Message>` of an S3 error answer, else the start of its body."""
    text = response.text[:400]
    start, end = text.find("<Message>"), text.find("</Message>")
    return text[start + 9 : end] if 0 <= start < end else text[:120]


def reason(exc: BaseException) -> str:
    if isinstance(exc, urllib3.exceptions.ProtocolError) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]  # its str() is the repr of (message, cause)
    else:
        text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


#: Failures to connect at all, in either HTTP stack (urllib3's NewConnectionError, and
#: NameResolutionError under it, are ConnectTimeoutErrors).
_NO_CONNECTION = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.ProxyError,
)
_TIMED_OUT = (httpx.TimeoutException, urllib3.exceptions.TimeoutError)
#: What a failed request to the blob store raises, in either HTTP stack.
BLOB_STORE_FAILURES = (httpx.TransportError, urllib3.exceptions.HTTPError)


class BlobGets:
    """urllib3 pools for the blob store's presigned GETs, configured as `RegistryHttp.blobs`
    is: the same timeouts and User-Agent, httpx's TLS trust (its default context: certifi, or
    SSL_CERT_FILE / SSL_CERT_DIR), the proxy the environment names for the URL (HTTP(S)_PROXY,
    ALL_PROXY, NO_PROXY, as httpx reads them), no retries and no redirects followed (the client's
    retry policy decides)."""

    def __init__(self, *, user_agent: str, maxsize: int):
        self._headers = {"User-Agent": user_agent}
        self._options = dict(
            timeout=urllib3.Timeout(connect=settings.CONNECT_TIMEOUT, read=settings.READ_TIMEOUT),
            retries=False,
            maxsize=maxsize,
            ssl_context=httpx.create_ssl_context(),
        )
        self._direct = urllib3.PoolManager(**self._options)
        self._proxied: dict[str, urllib3.ProxyManager] = {}

    def get(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """The answer to `GET url`, its body not read yet and not decoded: `.read(n)` gives the
        bytes as they came (n of them, fewer only where the body ends or was cut: urllib3
        buffers no decoded bytes that a cut would lose), then `.release_conn()`; `.close()` an
        answer abandoned part-way."""
        return self._pool(url).request(
            "GET",
            url,
            headers={**self._headers, **headers},
            preload_content=False,
            decode_content=False,
            redirect=False,
        )

    def _pool(self, url: str) -> urllib3.PoolManager:
        parts = urllib.parse.urlsplit(url)
        proxies = urllib.request.getproxies()
        proxy = proxies.get(parts.scheme) or proxies.get("all")
        if not proxy or urllib.request.proxy_bypass(parts.netloc):
            return self._direct
        if proxy not in self._proxied:
            self._proxied[proxy] = urllib3.ProxyManager(proxy, **self._options)
        return self._proxied[proxy]

    def clear(self) -> None:
        self._direct.clear()
        for pool in self._proxied.values():
            pool.clear()


# --- the connection -----------------------------------------------------------------------------
class RegistryHttp:
    """httpx clients for one registry (`api`, with the token) and for the blob store its
    presigned URLs point at (`blobs`, never with the token), and the translation of their
    failures into the client's errors."""

    def __init__(
        self, endpoint: str, token: str | None, *, upload_concurrency: int, unavailable_max_wait: float
    ):
        self.endpoint = endpoint
        #: Seconds an idempotent request may spend waiting out 503s with Retry-After (0: no retries).
        self.unavailable_max_wait = unavailable_max_wait
        timeout = httpx.Timeout(settings.READ_TIMEOUT, connect=settings.CONNECT_TIMEOUT)
        headers = {"User-Agent": f"deltactl/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.api = httpx.Client(base_url=endpoint, headers=headers, timeout=timeout)
        # Presigned blob-store URLs carry their own signature: this client never sends the token.
        pool = upload_concurrency + 2
        self.blobs = httpx.Client(
            timeout=timeout,
            headers={"User-Agent": headers["User-Agent"]},
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        )
        self.blob_gets = BlobGets(user_agent=headers["User-Agent"], maxsize=pool)

    def close(self) -> None:
        self.api.close()
        self.blobs.close()
        self.blob_gets.clear()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """An API request; an error answer raises its exception (`api_error`)."""
        with self.network(f"{method} {path}"):
            response = self.waiting_out_503(method, lambda: self.api.request(method, path, **kwargs))
        return raise_for_status(response)

    def post_once_more_if_lost(self, path: str, *, json: dict | None = None) -> tuple[httpx.Response, bool]:
        """`POST path` (with the body `json`), sent a second time if the connection failed before
        an answer came (for requests the registry answers the same way when repeated, like an
        upload's `complete`). Returns the answer and whether it answers a repeat (the first may
        have been acted on)."""
        sent = []

        def post() -> httpx.Response:
            sent.append(path)
            return self.api.post(path, json=json)

        with self.network(f"POST {path}"):
            response = retrying(
                post,
                attempts=2,
                retry_on=lambda exc: isinstance(exc, CONNECTION_LOST),
                wait=lambda state: 0.5,
            )
        return raise_for_status(response), len(sent) > 1

    def waiting_out_503(
        self, method: str, send: Callable[[], T], status: Callable[[T], int] = lambda r: r.status_code
    ) -> T:
        """`send()`, sent again while it answers 503 with a Retry-After the budget allows, when
        `method` is idempotent (GET, HEAD): at most UNAVAILABLE_ATTEMPTS tries, at most
        `unavailable_max_wait` seconds of waiting in all. Any other request is sent once.
        `status` reads an answer's status (urllib3's answers have `.status`)."""
        if method not in _IDEMPOTENT:
            return send()

        def wait_asked(response, state: tenacity.RetryCallState) -> bool:
            if status(response) != 503:
                return False
            delay = retry_after(response)
            return delay is not None and state.idle_for + delay <= self.unavailable_max_wait

        return retrying(
            send,
            attempts=settings.UNAVAILABLE_ATTEMPTS,
            retry_result=wait_asked,
            wait=lambda state: retry_after(state.outcome.result()) or 0.0,
            before_retry=lambda state: state.outcome.result().close(),
        )

    @contextlib.contextmanager
    def network(self, what: str) -> Iterator[None]:
        """Transport failures talking to the registry as the client's errors, naming it."""
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise RegistryUnreachableError(
                f"cannot reach the registry at {self.endpoint} ({reason(exc)}); is it running? "
                "(set DELTACTL_REGISTRY or `deltactl login --registry URL`)"
            ) from None
        except httpx.TimeoutException:
            raise NetworkError(f"the registry at {self.endpoint} did not answer {what} in time") from None
        except httpx.TransportError as exc:
            raise NetworkError(f"{what} at {self.endpoint} failed: {reason(exc)}") from None

    @contextlib.contextmanager
    def blob_store_network(self, url: str, what: str, *, upload: bool = False) -> Iterator[None]:
        """Like `network`, for a request to the blob store a presigned URL points at: failures
        name the store's host, not the registry (which answered)."""
        try:
            yield
        except BLOB_STORE_FAILURES as exc:
            raise self.blob_store_error(exc, netloc(url), what, upload=upload) from None

    def blob_store_error(
        self,
        exc: httpx.TransportError | urllib3.exceptions.HTTPError,
        store: str,
        what: str,
        *,
        upload: bool = False,
        brief: bool = False,
    ) -> NetworkError:
        """A failed request to the blob store at `store` (`host:port`) as the client's error, saying
        it is the blob store; `brief` leaves out what to do (the caller says it)."""
        if isinstance(exc, _NO_CONNECTION):
            message = f"cannot reach the blob store at {store} ({reason(exc)}) for {what}"
            if not brief:
                resume = " (running the same push again resumes it)" if upload else ""
                message += (
                    f"; the registry at {self.endpoint} answered, but the store it points to did not: "
                    f"retry when the store is reachable again{resume}"
                )
            return BlobStoreUnreachableError(message)
        if isinstance(exc, _TIMED_OUT):
            return NetworkError(f"the blob store at {store} did not answer {what} in time")
        return NetworkError(
            f"{what} {'to' if upload else 'from'} the blob store at {store} failed: {reason(exc)}"
        )
