"""Fail in seconds, with the endpoint named, when the configured Prefect API does not answer.

Without this, a flow started against a stopped server spends its client's retries (minutes)
before a connection error that names neither the setting nor the way out.
"""

from __future__ import annotations


class PrefectUnavailable(ConnectionError):
    """The Prefect API cannot be reached; the message says what to check. A connection error,
    so ``pilamim run`` exits with :data:`pilamim.cli.EXIT_TRANSIENT` (69), as for a tracking
    server that is down: run it again later."""


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect resolves it (environment, then profile); None = ephemeral."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def check_prefect_api(timeout_s: float = 5.0) -> None:
    """Probe ``<PREFECT_API_URL>/health``; an unset URL means a local temporary server: fine."""
    url = configured_api_url()
    if not url:
        return
    import httpx

    hint = (f"Is `prefect server start` running there and reachable from this machine? Check "
            f"PREFECT_API_URL (now {url!r}), or unset it to run the flow with a temporary "
            f"local server. Outputs already on disk are kept; rerun when the server is back.")
    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=timeout_s)
    except httpx.HTTPError as err:
        raise PrefectUnavailable(
            f"Prefect API {url} is unreachable ({type(err).__name__}). {hint}") from None
    if response.status_code >= 500:
        raise PrefectUnavailable(
            f"Prefect API {url} answered {response.status_code} on /health. {hint}")
