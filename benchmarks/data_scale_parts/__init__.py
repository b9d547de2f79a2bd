"""The pieces of :mod:`benchmarks.data_scale` (the CLI and the step order live there).

* :mod:`.common` -- step names, the JSON lines, the machine score, and running one step as a
  child process with its wall time and peak memory;
* :mod:`.images` -- the synthetic image folder and the decode + verify ceiling;
* :mod:`.project` -- a fresh DVC checkout of the working tree, its params and DVC's bookkeeping;
* :mod:`.loaders` -- the per-file baseline loader and the project's loader over prepared data;
* :mod:`.s3` -- SeaweedFS on loopback, DVC's remote on it, and plain boto3 copies to compare;
* :mod:`.steps` -- one function per step, run by the CLI in order.
"""
