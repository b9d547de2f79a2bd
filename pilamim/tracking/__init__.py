"""MLflow tracking: where runs go (:mod:`.server`), what a stage or pipeline run records
(:mod:`.runs`), the metric logger the library reports through (:mod:`.logger`), the data set as
a run input (:mod:`.datasets`) and closing runs whose process died (:mod:`.owners`).

This layer sits above the method library and below the stages: it imports neither the stages
nor Prefect (``tests/test_layers.py``).
"""
