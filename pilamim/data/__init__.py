"""Data: a source's inventory -> validated, split, hashed shards + manifest -> torch datasets.

Import the submodules directly (``pilamim.data.prepare``, ``pilamim.data.dataset`` ...); this
package file stays import-light so ``pilamim fetch`` does not pay for torch.
"""

from pilamim.data.errors import DataError

__all__ = ["DataError"]
