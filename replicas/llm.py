"""Offline batch generation: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

from tqdm import tqdm

from replicas.config import EngineConfig
from replicas.engine import LLMEngine
from replicas.outputs import RequestOutput
from replicas.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs every prompt through one engine with continuous batching; outputs come back in input order."""

    def __init__(self, model: str, **engine_config: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_config))
        self._request_counter = 0

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one, or one per prompt")
        order: dict[str, int] = {}
        for prompt, prompt_params in zip(prompts, params):
            request_id = f"offline-{self._request_counter}"
            self._request_counter += 1
            self.engine.add_request(request_id, prompt, prompt_params)
            order[request_id] = len(order)
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm) as progress:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        progress.update()
        return results  # type: ignore[return-value]
