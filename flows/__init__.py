"""Prefect flows of the PiLaMIM pipeline.

Local defaults, set before Prefect is imported and only where the user has not chosen: the
ephemeral API server gets 90 s to start (its 20 s default fails on a busy 2-core machine) and
sends no analytics (offline machines log errors for it).
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
