"""The one exception type the data package raises for problems a user can fix, and the two path
guards that raise it.

The guards live here, beside :class:`DataError`, because every source kind and the code that
names their inventory folders need them, and every refusal they make is a user-fixable
:class:`DataError`.
"""

from __future__ import annotations

from pathlib import Path


class DataError(RuntimeError):
    """A data source or image folder is unusable; the message says what is wrong and what to do.

    Raised for user-fixable problems (missing folder, no class subfolders, bad S3 credentials,
    undecodable images with ``bad_images: fail`` ...) so the CLI can print one clear line instead
    of a traceback.
    """


def plain_parts(value: str, what: str, fix: str) -> list[str]:
    """Split the ``/``-separated relative path ``value``; refuse it unless every part is a name.

    Anything joined under ``raw_dir`` or a source root (an inventory folder name, an S3 bucket,
    prefix or key) must stay below it: a ``..`` part climbs out, an empty part (a leading or
    doubled ``/``) makes it absolute or lets two keys name one file, and ``.`` does the same.
    ``what`` names the value for the message, ``fix`` says what to write instead.
    """
    parts = value.split("/")
    if ".." in parts:
        problem = "a '..' part"
    elif "." in parts:
        problem = "a '.' part"
    elif "" in parts:
        problem = "an empty part (a leading, trailing or doubled '/')"
    else:
        return parts
    raise DataError(f"{what} {value!r} has {problem}, which could lead outside its download "
                    f"folder under raw_dir; {fix}")


def check_inside(path: Path, root: Path, action: str, seen: set[Path] | None = None) -> Path:
    """Refuse to ``action`` (write, delete) ``path`` unless its entry lies inside ``root``.

    The folder holding the entry is resolved (links followed) and must be ``root`` or below it;
    the entry itself is not followed, so replacing or deleting a link that lives inside ``root``
    (as DVC's symlink cache type leaves them) never touches the file it points at. This is the
    last guard against a linked folder or a bad name sending a fetch's writes or deletes
    elsewhere on the machine. ``seen`` (one set per run) remembers folders already found
    inside, so a million files in a few class folders cost a few resolves, not a million.
    """
    folder = path.parent
    if seen is not None and folder in seen:
        return path
    real_root = root.resolve()
    where = folder.resolve()
    if where != real_root and real_root not in where.parents:
        raise DataError(
            f"refusing to {action} {path}: its folder resolves to {where}, outside {real_root} "
            "(a linked folder inside the download folder?). Remove the link and run again."
        )
    if seen is not None:
        seen.add(folder)
    return path
