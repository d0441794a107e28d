"""The hf teacher: a local transformers model answering in batches with its own chat template.

Loading and decoding live in `imitate.models` (shared with train and eval); see there for how request params map to
generation.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from imitate.collect.teachers import Completion, Request
from imitate.models import generate_batch, load_model, resolve_model


class LocalTeacher:
    """`hf:PATH_OR_ID`: a local transformers model. Loads on the first batch; one batch at a time."""

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        batch_size: int = 16,
        trust_remote_code: bool = False,
        dtype: str | None = None,
    ):
        self.model_ref = resolve_model(model)  # cheap check: a missing directory fails now, not after loading
        self.spec = "hf:" + model
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # generate() calls from concurrent tasks run one after another

    def load(self) -> None:
        if self._model is None:
            self._model, self._tokenizer = load_model(
                self.model_ref, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )

    def complete_sync(self, requests: list[Request]) -> list[Completion]:
        """Answer requests in order; requests with different params are generated in separate groups."""
        with self._lock:
            self.load()
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.params, sort_keys=True, default=str), []).append(i)
            results: list[Completion | None] = [None] * len(requests)
            for members in groups.values():
                p = requests[members[0]].params
                for s in range(0, len(members), max(1, self.batch_size)):
                    chunk = members[s : s + max(1, self.batch_size)]
                    outs = generate_batch(
                        self._model,
                        self._tokenizer,
                        [requests[i].messages for i in chunk],
                        max_tokens=int(p.get("max_tokens") or 256),
                        temperature=float(p["temperature"]) if p.get("temperature") is not None else 1.0,
                        top_p=float(p["top_p"]) if p.get("top_p") is not None else 1.0,
                        logprobs=p.get("logprobs") or None,
                        seed=p.get("seed"),
                    )
                    for i, c in zip(chunk, outs):
                        results[i] = c
            return results  # type: ignore[return-value]

    async def complete(self, requests: list[Request]) -> list[Completion]:
        # generate() blocks for seconds: run it in a worker thread so the event loop (progress, journal) stays live
        return await asyncio.to_thread(self.complete_sync, list(requests))

    async def aclose(self) -> None:
        self._model = self._tokenizer = None
