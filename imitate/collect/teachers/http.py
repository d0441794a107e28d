"""What the two API teachers share: the SDK client and the constructor around it.

One SDK client per run, shared by all requests, its connection pool at least as large as the run's concurrency, and
the SDK's own retries off: the collect engine retries, paces and journals, so it must see every failure.
(Splitting the connections over several clients, to shorten httpcore's per-request scan of its pool, measured no
better within noise in benchmarks/collect_throughput.py, so one client it is.)
"""

from __future__ import annotations

import importlib
from typing import Any


def sdk_client(
    sdk: Any, client_cls: str, *, api_key: str | None, base_url: str | None, timeout: float, concurrency: int
) -> Any:
    """`sdk` is the imported openai or anthropic module; `client_cls` its async client class name."""
    import httpx2

    pool = httpx2.Limits(max_connections=max(2 * concurrency, 100), max_keepalive_connections=max(concurrency, 20))
    http = sdk.DefaultAsyncHttpxClient(limits=pool, timeout=timeout)
    return getattr(sdk, client_cls)(
        api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout, http_client=http
    )


class SDKTeacher:
    """Base of the API teachers: `provider` names the SDK module, `client_cls` its async client class."""

    provider = ""
    client_cls = ""
    supports_n = False  # several samples of one prompt in one call
    batch_size = 1

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 64,
        client: Any = None,  # an SDK client to use instead (tests)
    ):
        self.model = model
        self.spec = f"{self.provider}:{model}"
        self.custom_server = base_url is not None
        if client is None:
            sdk = importlib.import_module(self.provider)
            client = sdk_client(
                sdk, self.client_cls, api_key=api_key, base_url=base_url, timeout=timeout, concurrency=concurrency
            )
        self.client = client

    async def aclose(self) -> None:
        await self.client.close()
