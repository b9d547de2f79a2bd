"""Parts of the fidelity study (``python -m benchmarks.fidelity``), one job per module.

``budgets`` (shared params per budget), ``lowlevel`` (cached eval images, the pixel-level
task), ``protocols`` (the evaluation every entry gets), ``runs`` (one entry x seed:
resumable, tracked), ``parallel`` (worker processes), ``stats`` (mean ± std, comparisons
against the seed spread, targets), ``reading`` (the generated honest reading), ``report`` and
``chart`` (markdown, JSON, PNG).

Not named ``benchmarks/fidelity/``: a package of that name would shadow ``fidelity.py``.
"""
