"""Fixtures for the Prefect flow tests: a real temporary Prefect server for the session.

No mocks: the flow runs its real stages, talks to a real Prefect API (``prefect_test_harness``
starts a server subprocess on a temporary SQLite database), records in a real MLflow store and
asks real DVC about ``dvc.lock`` (helpers in :mod:`tests.flows.support`).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect server (SQLite) with its own PREFECT_HOME, for the whole session."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={
        PREFECT_HOME: home,
        PREFECT_LOCAL_STORAGE_PATH: home / "storage",
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90,
    }):
        with prefect_test_harness(server_startup_timeout=90):
            yield home
