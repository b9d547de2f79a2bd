"""The MLflow fixtures (:mod:`tests.mlflow_store`): every test here gets a private SQLite store."""

from tests.mlflow_store import empty_store, encoder_dir, mlflow_store, params  # noqa: F401
