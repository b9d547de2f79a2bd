"""Mirror ``s3://bucket/prefix`` into a local folder with boto3, resumably.

boto3 takes endpoint and credentials from the usual AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` ...), read fresh on every call. Unchanged objects (same ETag and size, as
recorded in the folder's state file) are not downloaded again; files gone from the bucket are
removed locally. Every failure is a :class:`DataError` that names the endpoint and what to check,
never a credential.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pilamim.data.errors import DataError
from pilamim.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

S3_STATE = ".pilamim-s3-state.json"

def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DataError(f"data.source {uri!r}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def materialize_s3(uri: str, dest: Path) -> Path:
    """Mirror ``uri`` into ``dest``; return ``dest``."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, prefix = parse_s3_uri(uri)
    # A fresh session reads AWS_* settings now: the default session caches credentials.
    client = boto3.session.Session().client("s3")
    endpoint = client.meta.endpoint_url
    try:
        objects = list(_list_objects(client, bucket, f"{prefix}/" if prefix else ""))
        if not objects:
            raise DataError(f"no objects under {uri} at S3 endpoint {endpoint}; "
                            "upload <class>/<image> files there or fix data.source")
        _mirror(client, bucket, objects, dest)
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
    return dest


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


def _list_objects(client, bucket: str, prefix: str) -> Iterator[tuple[str, str, str, int]]:
    """Yield ``(key, path relative to prefix, etag, size)`` for every file under ``prefix``."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):  # folder marker
                continue
            rel = PurePosixPath(key[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise DataError(f"refusing S3 key {key!r}: it would escape the download folder")
            yield key, str(rel), obj.get("ETag", ""), int(obj["Size"])


def _mirror(client, bucket: str, objects: list[tuple[str, str, str, int]], dest: Path) -> None:
    """Download changed objects into ``dest`` and delete local files no longer in the bucket."""
    dest.mkdir(parents=True, exist_ok=True)
    state_path = dest / S3_STATE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    wanted = {rel for _, rel, _, _ in objects}
    for path in sorted(dest.rglob("*")):
        rel = path.relative_to(dest).as_posix()
        if path.is_file() and rel != S3_STATE and rel not in wanted:
            path.unlink()
            state.pop(rel, None)
    fetched = 0
    for key, rel, etag, size in tqdm(objects, desc="s3 sync", unit="file", disable=None):
        local = dest / rel
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
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
