"""An object-storage location: a URI parsed (never holding a secret) and its pyarrow filesystem opened.

Credentials and endpoint come from the standard environment only (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, profiles; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS): a URI
holding ``user:secret@`` or a query string is refused, so the URI itself can be recorded and printed as is and
no secret ever lands in a manifest, a log line or shell history. pyarrow's ``S3FileSystem`` constructor does
not read ``AWS_ENDPOINT_URL`` (apache/arrow#49643; only ``FileSystem.from_uri`` does), so this module does.

pyarrow is imported inside functions: importing kvray.data stays light.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from kvray.errors import KvrayInputError

# What a process writing to a bucket needs from the environment: forwarded to the collector actor, which may
# run in a Ray worker started before these were set (a joined cluster).
STORAGE_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST",
)  # fmt: skip
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 120.0
RETRY_ATTEMPTS = 3
CHUNK_BYTES = 8 * 2**20  # a file is streamed in pieces of this size, never read whole into memory

URI_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")


@dataclass(frozen=True)
class Remote:
    """An object-storage location: ``uri`` as the user wrote it (no secrets: ``parse_remote`` refuses them)."""

    uri: str  # scheme://bucket/prefix, without a trailing slash
    scheme: str  # s3 | gs | …
    bucket: str
    prefix: str  # inside the bucket; "" for the bucket itself

    @property
    def path(self) -> str:
        """The location as a pyarrow filesystem names it: ``bucket/prefix``."""
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket


def parse_remote(uri: str) -> Remote:
    """``scheme://bucket/prefix`` → Remote; one-line KvrayInputError for what kvray cannot use."""
    m = URI_PATTERN.match(uri)
    if not m:
        raise KvrayInputError(f"{uri!r} is not a URI (scheme://bucket/prefix)")
    scheme, rest = m.group(1).lower(), m.group(2)
    authority, _, path = rest.partition("/")
    if "?" in uri or "#" in uri:
        raise KvrayInputError(
            f"{shown_uri(uri)}: a URI with a query string is not accepted; set credentials, region and endpoint "
            "in the environment (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if "@" in authority:
        raise KvrayInputError(
            f"{shown_uri(uri)}: credentials in a URI are not accepted (they would end up in logs and shell "
            "history); set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …)"
        )
    if not authority:
        raise KvrayInputError(f"{uri}: no bucket (expected {scheme}://bucket/prefix)")
    prefix = "/".join(p for p in path.split("/") if p)
    if any(p in (".", "..") for p in prefix.split("/")):
        raise KvrayInputError(f"{uri}: '.' and '..' are not allowed in an object-storage prefix")
    return Remote(f"{scheme}://{authority}" + (f"/{prefix}" if prefix else ""), scheme, authority, prefix)


def shown_uri(uri: str) -> str:
    """``uri`` without what may be secret (user info, query): safe to print."""
    m = URI_PATTERN.match(uri)
    if not m:
        return uri
    authority, slash, path = m.group(2).partition("/")
    return f"{m.group(1)}://{authority.rpartition('@')[2]}{slash}{path}".split("?")[0].split("#")[0]


def s3_endpoint() -> str | None:
    """The S3 endpoint the environment names: ``AWS_ENDPOINT_URL_S3`` before ``AWS_ENDPOINT_URL`` (the AWS
    SDKs' order); None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def open_filesystem(remote: Remote) -> Any:
    """The pyarrow filesystem of ``remote``, configured from the environment; KvrayInputError when the scheme
    is one pyarrow has no filesystem for."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    if remote.scheme == "s3":
        endpoint = s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        options: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "request_timeout": REQUEST_TIMEOUT_S,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS),
        }
        if endpoint:
            scheme, sep, host = endpoint.partition("://")
            options.update(
                endpoint_override=host.rstrip("/") if sep else endpoint,
                scheme=scheme if sep else "https",
                region=region or "us-east-1",
            )
        else:
            if not region:
                try:  # AWS answers a request in the wrong region with a redirect pyarrow does not follow
                    region = pafs.resolve_s3_region(remote.bucket)
                except (OSError, pa.ArrowException) as exc:
                    raise KvrayInputError(
                        f"{remote.uri}: cannot find bucket {remote.bucket!r}: {first_line(exc)}"
                    ) from None
            options["region"] = region
        return pafs.S3FileSystem(**options)
    try:
        fs, _ = pafs.FileSystem.from_uri(remote.uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise KvrayInputError(
            f"{remote.uri}: unknown storage scheme {remote.scheme!r} ({first_line(exc)}); use a local path, "
            "s3://bucket/prefix or gs://bucket/prefix"
        ) from None
    except OSError as exc:
        raise KvrayInputError(f"{remote.uri}: cannot open the storage: {first_line(exc)}") from None
    return fs


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__
