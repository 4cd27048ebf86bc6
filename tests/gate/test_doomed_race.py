"""Two requests for a model the supervisor just unloaded, at once: both find it gone from
/api/ps after the same shared read, and neither may fail for the other having cleared the
mark first (the request was cut, 'Server disconnected', in a benchmark run)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from supervisor.estimate import EstimateParams
from supervisor.gate.admission import Admission
from supervisor.gate.stats import Counters
from supervisor.model import OllamaModel


class NothingLoaded:
    base_url = ""

    def ps(self) -> tuple[OllamaModel, ...]:
        return ()


def test_two_requests_for_a_doomed_model_both_get_an_answer() -> None:
    async def main() -> list[bool | None]:
        with ThreadPoolExecutor(2) as pool:
            admission = Admission(
                ollama=NothingLoaded(),  # type: ignore[arg-type]
                room=None,  # type: ignore[arg-type]
                executor=pool,
                stats=Counters(),
                wait_s=1.0,
                params=EstimateParams(),
                ps_ttl_s=0.5,
                ps_max_stale_s=2.0,
                load_hold_max_s=5.0,
            )
            admission.doom("llama3.1:8b")
            return await asyncio.gather(
                admission.is_resident("llama3.1:8b"), admission.is_resident("llama3.1:8b")
            )

    assert asyncio.run(main()) == [False, False]
