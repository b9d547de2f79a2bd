"""``s3://bucket/prefix`` as a source: listed into an inventory, each object read on demand.

Copying a million-object set onto every machine before ``prepare`` reads each object once
would double the traffic and the disk, so ``fetch`` only lists the prefix (key, size, ETag;
:mod:`pilamim.data.inventory`) and ``prepare`` GETs each object with ``If-Match`` on the
recorded ETag: an object overwritten or deleted since the fetch is refused, never read.

boto3 takes endpoint and credentials from the usual AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` ...), read fresh by every new client; a reader opens its client lazily,
in the process that reads. Every failure is a :class:`DataError` that names the endpoint and
what to check, never a credential. Keys below the prefix must be plain ``/``-separated names
(no ``..``, ``.``, empty or leading-``/`` parts), as paths of an image folder are; one bad key
refuses the whole listing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pilamim.data.errors import DataError, plain_parts
from pilamim.data.fetch_report import FETCH_REPORT
from pilamim.data.inventory import (
    INVENTORY,
    InventoryFiles,
    Stamp,
    class_names,
    visible,
    write_inventory,
)

log = logging.getLogger(__name__)

URI_FIX = "write data.source as s3://bucket/prefix with plain folder names (e.g. s3://images/pets)"
KEY_FIX = ("rename or delete that object: below the prefix, keys must be plain "
           "<class>/<image> paths")
REFETCH = "run `pilamim fetch` again"
RESERVED = frozenset({INVENTORY, FETCH_REPORT})  # pilamim's bookkeeping file names
READ_TRIES = 4
BACKOFF_S = 0.5  # doubled after each failed try
TRANSIENT_CODES = frozenset({"500", "502", "503", "504", "InternalError", "ServiceUnavailable",
                             "SlowDown", "RequestTimeout"})

Objects = list[tuple[str, str, str, int]]  # (key, path relative to the prefix, etag, size)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``.

    Both are joined under ``raw_dir`` to name the inventory folder, so ``..``, ``.`` and empty
    parts (``s3://b//x``, ``s3://b/a//c``) are refused here, before anything is written.
    """
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DataError(f"data.source {uri!r}: expected s3://bucket/prefix")
    plain_parts(bucket, f"data.source {uri!r}: bucket", URI_FIX)
    prefix = prefix.rstrip("/")
    if prefix:
        plain_parts(prefix, f"data.source {uri!r}: prefix", URI_FIX)
    return bucket, prefix


def _new_client(**config: Any):
    import boto3
    from botocore.config import Config

    # A fresh session reads AWS_* settings now: the default session caches credentials.
    return boto3.session.Session().client("s3", config=Config(**config) if config else None)


def _explained(err: Exception, uri: str, bucket: str, endpoint: str) -> DataError | None:
    """A boto3 error as a :class:`DataError` saying what to check; None for any other."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(err, NoCredentialsError):
        return DataError(f"no S3 credentials for {uri} (endpoint {endpoint}): set "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(err, ClientError):
        return DataError(_explain_client_error(err, uri, bucket, endpoint))
    if isinstance(err, BotoCoreError):  # connection refused, DNS, timeouts ...
        return DataError(f"cannot reach S3 endpoint {endpoint} for {uri}: {err}. Is the server "
                         "running and AWS_ENDPOINT_URL right?")
    return None


def fetch_s3(uri: str, dest: Path) -> list[str]:
    """List ``uri`` into the inventory in ``dest`` (nothing is downloaded); return its empty
    class folders.

    An empty class folder exists in S3 only as a folder marker (a ``<class>/`` key with nothing
    below it); it is returned so the caller can report it rather than drop it silently.
    """
    bucket, prefix = parse_s3_uri(uri)
    client = _new_client()
    endpoint = client.meta.endpoint_url
    try:
        objects, markers = _list_objects(client, bucket, f"{prefix}/" if prefix else "",
                                         RESERVED)
    except Exception as err:
        explained = _explained(err, uri, bucket, endpoint)
        if explained is None:
            raise
        raise explained from err
    if not objects:
        raise DataError(f"no objects under {uri} at S3 endpoint {endpoint}; "
                        "upload <class>/<image> files there or fix data.source")
    classes = class_names(rel for _, rel, _, _ in objects)
    if not classes:
        raise DataError(f"no class folders under {uri} at S3 endpoint {endpoint}; "
                        "expected <prefix>/<class name>/<image files>")
    dest.mkdir(parents=True, exist_ok=True)
    write_inventory(dest, {"kind": "s3", "bucket": bucket, "prefix": prefix, "classes": classes},
                    [[rel, size, etag] for _, rel, etag, size in objects if visible(rel)])
    log.info("%s: listed %d objects in %d classes", uri, len(objects), len(classes))
    return sorted({m for m in markers if "/" not in m} - set(classes))


def _explain_client_error(err, uri: str, bucket: str, endpoint: str) -> str:
    code = str(err.response.get("Error", {}).get("Code", ""))
    message = err.response.get("Error", {}).get("Message", "")
    if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                "Forbidden", "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}:
        return (f"S3 endpoint {endpoint} rejected the credentials for {uri} ({code}: {message}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions")
    if code in {"NoSuchBucket", "404", "NotFound"}:
        return f"bucket {bucket!r} does not exist at S3 endpoint {endpoint} (data.source {uri})"
    return f"S3 endpoint {endpoint} failed for {uri}: {code}: {message}"


def _list_objects(client, bucket: str, prefix: str,
                  reserved: frozenset[str]) -> tuple[Objects, list[str]]:
    """The files under ``prefix`` and the folder markers (paths relative to ``prefix``).

    Every file's path below the prefix is checked here: one bad key refuses the whole listing.
    """
    files: Objects = []
    markers: list[str] = []
    for key, etag, size in _list_keys(client, bucket, prefix):
        rel = key[len(prefix):]
        if key.endswith("/"):  # folder marker
            if rel.strip("/"):
                markers.append(rel.rstrip("/"))
            continue
        plain_parts(rel, f"S3 object s3://{bucket}/{key}: path below the prefix", KEY_FIX)
        if rel in reserved:
            raise DataError(f"S3 object s3://{bucket}/{key} has the name of pilamim's own "
                            f"bookkeeping file {rel!r}; {KEY_FIX}")
        files.append((key, rel, etag, size))
    return files, markers


def _list_keys(client, bucket: str, prefix: str) -> Iterator[tuple[str, str, int]]:
    """Yield ``(key, etag, size)`` for every object whose key starts with ``prefix``."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield obj["Key"], obj.get("ETag", ""), int(obj["Size"])


class S3Files(InventoryFiles):
    """A fetched ``s3://`` prefix: each object read with ``If-Match`` on its recorded ETag."""

    _per_process = ("_client",)

    def __init__(self, root: Path, source: str, stamp: Stamp, header: dict) -> None:
        super().__init__(root, source, stamp)
        self.bucket, self.prefix = parse_s3_uri(source.strip())
        if (header.get("bucket"), header.get("prefix")) != (self.bucket, self.prefix):
            raise DataError(f"{root} lists s3://{header.get('bucket')}/{header.get('prefix')}, "
                            f"not data.source {source!r}; {REFETCH}")
        self._client = None

    def _s3(self):
        if self._client is None:  # boto3's own retries off: read() retries with its backoff
            self._client = _new_client(retries={"total_max_attempts": 1})
        return self._client

    def read(self, rel: str) -> bytes:
        size, etag = self.entry(rel)
        key = f"{self.prefix}/{rel}" if self.prefix else rel
        uri = f"s3://{self.bucket}/{key}"
        client = self._s3()
        endpoint = client.meta.endpoint_url
        for attempt in range(READ_TRIES):
            try:
                return self._get(client, key, uri, size, etag)
            except Exception as err:
                if not _transient(err):
                    explained = _explained(err, uri, self.bucket, endpoint)
                    if explained is None:
                        raise
                    raise explained from err
                if attempt == READ_TRIES - 1:
                    raise DataError(f"cannot read {uri} from S3 endpoint {endpoint} ({READ_TRIES} "
                                    f"tries): {err}. Is the server running and AWS_ENDPOINT_URL "
                                    "right?") from err
                log.warning("reading %s failed (%s); trying again", uri, err)
                time.sleep(BACKOFF_S * 2 ** attempt)
        raise AssertionError("unreachable")

    def _get(self, client, key: str, uri: str, size: int, etag: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in {"PreconditionFailed", "412"}:
                raise DataError(f"{uri} changed since `pilamim fetch` listed it (its ETag is no "
                                f"longer {etag}); {REFETCH}") from None
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise DataError(f"{uri} is gone since `pilamim fetch` listed it; "
                                f"{REFETCH}") from None
            raise
        data = response["Body"].read()
        if response.get("ETag", etag) != etag or len(data) != size:
            raise DataError(f"{uri} changed since `pilamim fetch` listed it (got {len(data)} "
                            f"bytes, ETag {response.get('ETag')}; listed {size} bytes, ETag "
                            f"{etag}); {REFETCH}")
        return data


def _transient(err: Exception) -> bool:
    """Whether a boto3 error may pass on its own (a dropped connection, a busy server)."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, ClientError):
        return str(err.response.get("Error", {}).get("Code", "")) in TRANSIENT_CODES
    return isinstance(err, HTTPClientError | BotoConnectionError | IncompleteReadError)
