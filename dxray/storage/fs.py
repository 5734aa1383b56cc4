"""Filesystems for outputs and inputs: a local folder or any S3-compatible endpoint.

pyarrow's ``S3FileSystem`` ignores ``AWS_ENDPOINT_URL``, so the S3 client is built here from
:class:`StorageConfig` and the usual AWS environment variables. Credentials are never passed
explicitly: the AWS SDK takes them from the environment, a profile or an instance role, so no
object built here holds a secret and nothing written from here can leak one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from dxray.config import StorageConfig
from dxray.errors import DxrayError, one_line
from dxray.storage import redact

log = logging.getLogger("dxray.storage")
T = TypeVar("T")

CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE"
CHECK_SECONDS = 5.0  # check_output gives up on an unreachable endpoint after this long

# pyarrow reports every S3 failure as a bare OSError: tell them apart by the AWS error names.
_PERMANENT = re.compile(
    r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|"
    r"SignatureDoesNotMatch|NO_SUCH_BUCKET|NoSuchBucket|Bucket '[^']*' not found|NO_SUCH_KEY|NoSuchKey|"
    r"RESOURCE_NOT_FOUND|INVALID_CLIENT_TOKEN|EXPIRED_TOKEN|ExpiredToken|MISSING_AUTHENTICATION|"
    r"not found|Forbidden|HTTP status 40[0-4]")
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|[Uu]nable to connect|[Cc]ould not connect|[Cc]onnection (refused|reset|closed)|"
    r"[Tt]imed? ?out|TIMEOUT|REQUEST_TIMEOUT|SLOW_DOWN|SlowDown|SERVICE_UNAVAILABLE|ServiceUnavailable|"
    r"INTERNAL_FAILURE|InternalError|THROTTLING|Throttling|TOO_MANY_REQUESTS|HTTP status 5\d\d|"
    r"[Bb]roken pipe|[Ee]mpty reply|[Tt]emporar")
_ACCESS = re.compile(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|"
                     r"SignatureDoesNotMatch|INVALID_CLIENT_TOKEN|EXPIRED_TOKEN|ExpiredToken|MISSING_AUTHENTICATION|"
                     r"Forbidden|HTTP status 403|[Pp]ermission denied")
_NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|Bucket '[^']*' not found|bucket does not exist")


_AWS_ERROR = re.compile(r"AWS Error (?P<name>\w+)(?: \(HTTP status (?P<status>\d+)\))? during \w+ operation:?\s*(?P<detail>.*)")
_ACCESS_HINTS = {
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key",
    "INVALID_ACCESS_KEY_ID": "the access key id is unknown to this endpoint",
    "EXPIRED_TOKEN": "the session token has expired",
}


def _storage_line(err: BaseException, limit: int = 240) -> str:
    """A storage error on one line: an AWS error as its name and message only (not the key it was about)."""
    text = one_line(err, typed=False)
    m = _AWS_ERROR.search(text)
    if m:
        detail = re.sub(r"\s*\(Request ID: [^)]*\)", "", m["detail"]).strip(" .")
        detail = re.sub(r"curlCode: \d+, |; Details: .*", "", detail)
        name = m["name"] if m["name"] != "UNKNOWN" or not m["status"] else f"HTTP {m['status']}"
        text = f"{name}: {detail}" if detail and detail != "No response body" else name
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_transient(err: BaseException) -> bool:
    """True for storage errors worth retrying: connection failures, timeouts, throttling, 5xx."""
    if not isinstance(err, OSError) or isinstance(
            err, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError | FileExistsError):
        return False
    if isinstance(err, TimeoutError | ConnectionError):
        return True
    text = str(err)
    return not _PERMANENT.search(text) and bool(_TRANSIENT.search(text))


def retrying(call: Callable[[], T], *, deadline_s: float, what: str, quiet: bool = False) -> T:
    """``call()``, retried with exponential backoff and jitter while it fails with a transient error.

    ``quiet``: log the retries at debug level only (a probe whose failure becomes its own one line).
    ``what`` names the operation and its URI ("writing s3://b/run/tasks/part-x.parquet"). A permanent
    error (access denied, no such bucket, not found, ...) is raised at once, unchanged; a transient
    one still failing after ``deadline_s`` seconds becomes a one-line :class:`DxrayError`.
    """
    # A bounded deadline loop over pyarrow's OSErrors: pyarrow gives no typed S3 errors and its own
    # SDK retries stop after a few quick attempts, so outages of minutes need this (no extra dependency).
    start = time.monotonic()
    logged = start - 60
    delay = 0.25
    while True:
        try:
            return call()
        except OSError as err:
            if not is_transient(err):
                raise
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise DxrayError(f"storage unavailable while {what}: still failing after "
                                 f"{time.monotonic() - start:.0f} s ({_storage_line(err)})") from err
            pause = min(left, delay * random.uniform(0.5, 1.0))
            loud = not quiet and time.monotonic() - logged >= 30  # the first failure, then one line every 30 s
            log.log(logging.WARNING if loud else logging.DEBUG, "%s failed (%s); retrying for up to %.0f s more",
                    what, _storage_line(err, 160), left)
            logged = time.monotonic() if loud else logged
            time.sleep(pause)
            delay = min(delay * 2, 5.0)


def endpoint_url(storage: StorageConfig | None = None) -> str | None:
    """The S3 endpoint in force: config, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (None: AWS)."""
    storage = storage or StorageConfig()
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(storage: StorageConfig | None = None, *, sdk_attempts: int | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 client for ``storage`` (endpoint, region, addressing, timeouts); credentials from the SDK chain."""
    storage = storage or StorageConfig()
    url = endpoint_url(storage)
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kw: dict = {"connect_timeout": storage.connect_timeout, "request_timeout": storage.request_timeout}
    if sdk_attempts is not None:
        kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts)
    if url:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DxrayError(f"S3 endpoint {redact(url)!r} must look like http(s)://HOST[:PORT] "
                             f"(from storage.endpoint_url, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)")
        # pyarrow: force_virtual_addressing=False means path-style whenever an endpoint is given.
        kw |= {"endpoint_override": parts.netloc.rpartition("@")[2], "scheme": parts.scheme,
               "force_virtual_addressing": storage.path_style is False, "region": region or "us-east-1"}
    else:
        if region:
            kw["region"] = region
        if storage.path_style and region:
            # pyarrow only does path-style with an endpoint: name AWS's regional one explicitly.
            kw |= {"endpoint_override": f"s3.{region}.amazonaws.com", "scheme": "https"}
    return pafs.S3FileSystem(**kw)


SCHEMES = ("s3", "file")  # what dxray reads and writes; anything else is refused at once


def filesystem(output: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://`` or ``s3://bucket/prefix``.

    Other schemes are refused in one line before any connection is tried: pyarrow would accept
    gs:// or hdfs:// and then wait minutes for a metadata server or a library that is not there."""
    if "://" not in output:
        return pafs.LocalFileSystem(), str(Path(output).expanduser().resolve())
    scheme, _, rest = output.partition("://")
    where = redact(output)
    if scheme.lower() not in SCHEMES:
        raise DxrayError(f"{where}: the scheme {scheme.lower() + '://'!r} is not supported; dxray reads and writes "
                         f"a local folder or s3://bucket/prefix (S3-compatible stores via storage.endpoint_url)")
    if scheme.lower() == "file":
        return pafs.LocalFileSystem(), str(Path(urlsplit(output).path or "/").resolve())
    if "?" in rest or "#" in rest:
        raise DxrayError(f"{where}: query parameters are not supported in s3:// URIs; credentials come from "
                         f"{CREDENTIAL_VARS} or the instance role, the endpoint and region from storage.* or AWS_*")
    if "@" in rest:  # KEY:SECRET@bucket, the secret perhaps holding '/': no bucket name or usual key has an '@'
        raise DxrayError(f"{where}: credentials in the URI are not supported (KEY:SECRET@bucket; an s3:// URI may "
                         f"not hold '@'); set {CREDENTIAL_VARS} instead")
    bucket, *parts = rest.rstrip("/").split("/")
    if not bucket:
        raise DxrayError(f"{where} names no bucket (expected s3://bucket/prefix)")
    # S3 keys are names, not folder paths: 'a//b' and 'a/../b' would name other objects than 'a/b' and 'b'.
    if "" in parts:
        raise DxrayError(f"{where} has an empty path part ('//'); write s3://{bucket}/{'/'.join(p for p in parts if p)}")
    odd = next((p for p in parts if p in (".", "..")), None)
    if odd is not None:
        raise DxrayError(f"{where}: the path part '{odd}' is not allowed in an s3:// URI (S3 keys are plain names: "
                         f"'{odd}' moves to no other folder); write the prefix in full")
    return s3_filesystem(storage), rest.rstrip("/")


def check_output(output: str, storage: StorageConfig) -> None:
    """Prove ``output`` is writable before any model loads (write and delete a small hidden probe).

    Raises a one-line :class:`DxrayError` naming the output and what to fix: a missing bucket,
    refused credentials, an unreachable endpoint, or a local folder that cannot be written.
    """
    if "://" not in output:
        _check_local(output)
        return
    fs, base = filesystem(output, storage)
    if fs.type_name == "s3":
        fs = s3_filesystem(storage, sdk_attempts=1)  # fail fast: the loop below does the retrying
    probe = f"{base}/.dxray-probe-{uuid.uuid4().hex[:12]}"

    def write_and_delete() -> None:
        with fs.open_output_stream(probe) as f:
            f.write(b"dxray write check\n")
        fs.delete_file(probe)

    where = redact(output)
    try:
        retrying(write_and_delete, deadline_s=min(storage.retry_seconds, CHECK_SECONDS), what=f"checking {where}", quiet=True)
    except DxrayError as err:
        if fs.type_name != "s3" or err.__cause__ is None:
            raise
        raise _unreachable(f"output {where}", storage, err.__cause__) from None
    except OSError as err:
        text = str(err)
        bucket = base.split("/", 1)[0]
        if _NO_BUCKET.search(text):
            raise DxrayError(f"output {where}: bucket '{bucket}' does not exist (create it, or fix the output)") from None
        if _ACCESS.search(text):
            hint = next((h for name, h in _ACCESS_HINTS.items() if name in text), "")
            raise DxrayError(f"output {where}: access denied{' - ' + hint if hint else ''}; check {CREDENTIAL_VARS}, "
                             f"and that these credentials may write to bucket '{bucket}' ({_storage_line(err, 160)})") from None
        raise DxrayError(f"output {where} is not writable: {_storage_line(err, 200)}") from None


def _unreachable(label: str, storage: StorageConfig, cause: BaseException) -> DxrayError:
    """The one line for a probe that never reached the S3 endpoint; ``label`` is "output URI" or "run URI"."""
    endpoint = redact(endpoint_url(storage) or "the AWS default endpoint")
    return DxrayError(f"{label}: cannot reach the S3 endpoint {endpoint} ({_storage_line(cause, 120)}); is it running? "
                      f"It comes from storage.endpoint_url, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")


def check_reachable(run: str, path: str, storage: StorageConfig) -> None:
    """Prove the S3 endpoint of an existing run answers (one listing of the run folder, retried for a
    few seconds), so that a read command on an unreachable endpoint fails in seconds, not minutes."""
    fs = s3_filesystem(storage, sdk_attempts=1)
    try:
        retrying(lambda: fs.get_file_info(path), deadline_s=min(storage.retry_seconds, CHECK_SECONDS),
                 what=f"checking {redact(run)}", quiet=True)
    except DxrayError as err:
        if err.__cause__ is None:
            raise
        raise _unreachable(f"run {redact(run)}", storage, err.__cause__) from None
    except OSError as err:
        text = str(err)
        if _NO_BUCKET.search(text):
            raise DxrayError(f"no run found at {redact(run)}: bucket '{path.split('/', 1)[0]}' does not exist") from None
        if _ACCESS.search(text):
            raise DxrayError(f"run {redact(run)}: access denied; check {CREDENTIAL_VARS} ({_storage_line(err, 160)})") from None
        raise DxrayError(f"run {redact(run)} cannot be read: {_storage_line(err, 200)}") from None


def _check_local(output: str) -> None:
    path = Path(output).expanduser().resolve()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        from dxray.errors import what_is

        raise DxrayError(f"output {output}: {existing} is {what_is(existing)}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DxrayError(f"output {output} is not writable: permission denied on {existing}")
