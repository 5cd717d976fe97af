"""Resuming a request from output it already produced (contract.ResumeState, what a migrated request sends): the
tokens and text of the cut run and its continuation are exactly those of an uninterrupted run — greedy, seeded
sampling with penalties and min_tokens, a stop string across the cut, and a grammar replayed over the output."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from replicas import LLMEngine, RequestError, SamplingParams
from replicas.contract import ResumeState
from replicas.sampling_params import StructuredOutputParams
from tests.engine.helpers import make_engine, random_prompts

_ids = itertools.count()


@dataclass
class Run:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return make_engine(tiny_llama_dir, num_threads=1)


def generate(engine: LLMEngine, prompt: list[int], params: SamplingParams, resume: ResumeState | None = None,
             stop_after: int | None = None) -> Run:  # fmt: skip
    """Delta outputs of one request; with `stop_after`, aborted once that many tokens were delivered (a lost
    replica: what was delivered is all the client has)."""
    request_id = f"r{next(_ids)}"
    engine.add_request(request_id, prompt_token_ids=prompt, params=params, output_kind="delta", resume=resume)
    run = Run()
    while engine.has_unfinished():
        for output in engine.step():
            (completion,) = output.outputs or [None]
            if completion is None:
                continue
            run.token_ids += completion.token_ids
            run.text += completion.text
            run.finish_reason, run.stop_reason = completion.finish_reason, completion.stop_reason
        if stop_after is not None and len(run.token_ids) >= stop_after and run.finish_reason is None:
            engine.abort(request_id)
            return run
    return run


def cut_and_resume(engine: LLMEngine, prompt: list[int], params: SamplingParams, cut: int) -> Run:
    first = generate(engine, prompt, params, stop_after=cut)
    if first.finish_reason is not None:
        return first
    rest = generate(engine, prompt, params, ResumeState(list(first.token_ids), len(first.text)))
    return Run(first.token_ids + rest.token_ids, first.text + rest.text, rest.finish_reason, rest.stop_reason)


PROMPT = random_prompts(1, 12, 12, seed=7)[0]


@pytest.mark.parametrize("cut", [1, 5, 17])
def test_a_resumed_greedy_request_continues_exactly_as_an_uninterrupted_one(engine: LLMEngine, cut: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    whole = generate(engine, PROMPT, params)
    assert len(whole.token_ids) == 24
    assert cut_and_resume(engine, PROMPT, params, cut) == whole


@pytest.mark.parametrize("cut", [2, 9])
def test_a_resumed_seeded_request_continues_the_same_random_stream_and_penalties(engine: LLMEngine, cut: int) -> None:
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=20, min_tokens=15,
                            frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2)  # fmt: skip
    whole = generate(engine, PROMPT, params)
    assert cut_and_resume(engine, PROMPT, params, cut) == whole


def test_a_stop_string_across_the_cut_is_found_and_held_back_text_is_sent_once(engine: LLMEngine) -> None:
    free = generate(engine, PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    # A stop string made of the text of output tokens 10..12: it spans token boundaries, so every cut between
    # them leaves part of it held back on the first replica.
    stop = free.text[len(_text_of(engine, free.token_ids[:10])) : len(_text_of(engine, free.token_ids[:13]))]
    assert len(stop) >= 3 and free.text.find(stop) == len(_text_of(engine, free.token_ids[:10]))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    whole = generate(engine, PROMPT, params)
    assert whole.finish_reason == "stop" and whole.stop_reason == stop
    for cut in range(1, len(whole.token_ids)):
        assert cut_and_resume(engine, PROMPT, params, cut) == whole, cut


@pytest.mark.parametrize("cut", [3, 11])
def test_each_choice_of_a_seeded_n_request_resumes_as_a_one_sample_request(engine: LLMEngine, cut: int) -> None:
    # What the ingress does with an n > 1 request cut after tokens went out: choice i goes on as an n = 1 request
    # with the same params and ResumeState.sample_index = i, which draws from sample i's seeded stream.
    params = SamplingParams(n=3, temperature=1.0, top_k=50, seed=99, max_tokens=16, ignore_eos=True)
    engine.add_request("whole-n3", prompt_token_ids=PROMPT, params=params, output_kind="delta")
    whole: dict[int, Run] = {i: Run() for i in range(3)}
    while engine.has_unfinished():
        for output in engine.step():
            for completion in output.outputs:
                whole[completion.index].token_ids += completion.token_ids
                whole[completion.index].text += completion.text
                whole[completion.index].finish_reason = completion.finish_reason
                whole[completion.index].stop_reason = completion.stop_reason
    assert len({tuple(run.token_ids) for run in whole.values()}) > 1  # distinct streams, or the test shows nothing
    one = params.model_copy(update={"n": 1})
    for index, run in whole.items():
        delivered = run.token_ids[:cut]
        text = _text_of(engine, delivered)
        rest = generate(engine, PROMPT, one, ResumeState(delivered, len(text), sample_index=index))
        assert delivered + rest.token_ids == run.token_ids, index
        assert text + rest.text == run.text, index


def test_resume_is_refused_for_n_above_one_and_for_no_tokens_left(engine: LLMEngine) -> None:
    with pytest.raises(RequestError, match="n = 1"):
        engine.add_request("n2", prompt_token_ids=PROMPT, params=SamplingParams(n=2, seed=1),
                           resume=ResumeState([5, 6], 0))  # fmt: skip
    with pytest.raises(RequestError, match="none of max_tokens"):
        engine.add_request("full", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=2),
                           resume=ResumeState([5, 6], 0))  # fmt: skip


def test_a_resumed_structured_request_replays_its_grammar(default_model_dir: Path) -> None:
    engine = make_engine(default_model_dir, max_model_len=256, num_threads=1)
    spec = StructuredOutputParams(regex=r"[a-z]{3,6}( [a-z]{3,6}){2,5}\.")
    prompt = engine.tokenizer.encode("Write a short sentence:")
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_output=spec)
    whole = generate(engine, prompt, params)
    assert whole.finish_reason == "stop" and len(whole.token_ids) > 4
    for cut in (1, 3, len(whole.token_ids) - 2):
        assert cut_and_resume(engine, prompt, params, cut) == whole, cut


def _text_of(engine: LLMEngine, token_ids: list[int]) -> str:
    return engine.tokenizer.decode(token_ids, skip_special_tokens=True)
