"""The one exception type the data package raises for problems a user can fix."""

from __future__ import annotations


class DataError(RuntimeError):
    """A data source or image folder is unusable; the message says what is wrong and what to do.

    Raised for user-fixable problems (missing folder, no class subfolders, bad S3 credentials,
    undecodable images with ``bad_images: fail`` ...) so the CLI can print one clear line instead
    of a traceback.
    """
