"""Mirror ``s3://bucket/prefix`` into a local folder with boto3, resumably.

boto3 takes endpoint and credentials from the usual AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` ...), read fresh on every call. Unchanged objects (same ETag and size, as
recorded in the folder's state file) are not downloaded again; files gone from the bucket are
removed locally. Every failure is a :class:`DataError` that names the endpoint and what to check,
never a credential.

Nothing is written or deleted outside the destination folder: the bucket, the prefix and every
key below it must be plain ``/``-separated names (no ``..``, ``.``, empty or leading-``/`` parts;
checked before anything is written), and every single write and delete is checked again against
the resolved destination, so a linked folder inside it cannot send files elsewhere either.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from pilamim.data.errors import DataError, check_inside, plain_parts
from pilamim.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

S3_STATE = ".pilamim-s3-state.json"
URI_FIX = "write data.source as s3://bucket/prefix with plain folder names (e.g. s3://images/pets)"
KEY_FIX = ("rename or delete that object: below the prefix, keys must be plain "
           "<class>/<image> paths")

Objects = list[tuple[str, str, str, int]]  # (key, path relative to the prefix, etag, size)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``.

    Both are joined under ``raw_dir`` to name the mirror folder, so ``..``, ``.`` and empty
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


def materialize_s3(uri: str, dest: Path, keep: frozenset[str] = frozenset()) -> list[str]:
    """Mirror ``uri`` into ``dest``; return its empty class folders.

    An empty class folder exists in S3 only as a folder marker (a ``<class>/`` key with nothing
    below it); it is returned so the caller can report it rather than drop it silently. Files
    directly in ``dest`` named in ``keep`` belong to the caller and are never deleted.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = parse_s3_uri(uri)
    # A fresh session reads AWS_* settings now: the default session caches credentials.
    client = boto3.session.Session().client("s3")
    endpoint = client.meta.endpoint_url
    ours = frozenset({S3_STATE, *keep})
    try:
        objects, markers = _list_objects(client, bucket, f"{prefix}/" if prefix else "", ours)
        if not objects:
            raise DataError(f"no objects under {uri} at S3 endpoint {endpoint}; "
                            "upload <class>/<image> files there or fix data.source")
        _mirror(client, bucket, objects, dest, ours)
    except NoCredentialsError as err:
        raise DataError(
            f"no S3 credentials for {uri} (endpoint {endpoint}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from err
    except ClientError as err:
        raise DataError(_explain_client_error(err, uri, bucket, endpoint)) from err
    except BotoCoreError as err:  # connection refused, DNS, timeouts ...
        raise DataError(
            f"cannot reach S3 endpoint {endpoint} for {uri}: {err}. Is the server running and "
            "AWS_ENDPOINT_URL right?"
        ) from err
    classes = {rel.split("/", 1)[0] for _, rel, _, _ in objects if "/" in rel}
    return sorted({m for m in markers if "/" not in m} - classes)


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

    Every file's path below the prefix is checked here, before the first download: one bad key
    refuses the whole mirror, so nothing is half written because of it.
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


def _mirror(client, bucket: str, objects: Objects, dest: Path, ours: frozenset[str]) -> None:
    """Download changed objects into ``dest`` and delete local files no longer in the bucket.

    ``ours`` are the bookkeeping files at the top of ``dest`` that are never deleted. Every
    delete and write is checked with :func:`check_inside` against ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    state_path = dest / S3_STATE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    wanted = {rel for _, rel, _, _ in objects}
    inside: set[Path] = set()
    for path in sorted(dest.rglob("*")):
        rel = path.relative_to(dest).as_posix()
        if path.is_file() and rel not in ours and rel not in wanted:
            check_inside(path, dest, "delete", inside).unlink()
            state.pop(rel, None)
    fetched = 0
    for key, rel, etag, size in tqdm(objects, desc="s3 sync", unit="file", disable=None):
        local = check_inside(dest / rel, dest, "write", inside)
        known = state.get(rel, {})
        if (known.get("etag") == etag and known.get("size") == size and local.is_file()
                and local.stat().st_size == size):
            continue
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        atomic_write(local, lambda tmp, body=body: _copy_stream(body, tmp))
        if local.stat().st_size != size:
            raise DataError(f"s3://{bucket}/{key}: got {local.stat().st_size} bytes, "
                            f"expected {size}; rerun to retry")
        state[rel] = {"etag": etag, "size": size}
        fetched += 1
        if fetched % 500 == 0:  # a killed run resumes from here
            atomic_write_json(state_path, state)
    atomic_write_json(state_path, {k: state[k] for k in sorted(state) if k in wanted})
    _remove_empty_dirs(dest)
    log.info("s3://%s -> %s: %d downloaded, %d unchanged", bucket, dest, fetched,
             len(objects) - fetched)


def _copy_stream(body, tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        shutil.copyfileobj(body, handle, 1 << 20)


def _remove_empty_dirs(root: Path) -> None:
    """Remove empty folders below ``root`` (never linked ones, never outside it)."""
    for folder in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()),
                         reverse=True):
        if not any(folder.iterdir()):
            check_inside(folder, root, "delete").rmdir()
