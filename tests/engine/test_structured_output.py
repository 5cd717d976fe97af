"""Structured outputs in the engine: grammar-constrained rows batched with free ones, n > 1, preemption, stops and
limits, compile errors and dead states; outputs valid against their JSON schema, regex or choice list."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicas import AsyncEngine, RequestError, SamplingParams
from replicas.sampling_params import StructuredOutputParams
from tests.engine.helpers import make_engine

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "Who wrote Hamlet? Answer in JSON.", "Give me a user record.",
           "Invent a character for a novel.", "Tell me about your best friend.",
           "Name a famous scientist."]  # fmt: skip


@pytest.fixture(scope="module")
def engine(default_model_dir: Path):
    return make_engine(default_model_dir, max_model_len=512, max_num_seqs=16, kv_cache_memory_bytes=128 * 2**20)


def chat(engine, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def constrained(max_tokens: int = 64, temperature: float = 0.0, **spec: object) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0 if temperature else None,
                          structured_output=StructuredOutputParams(**spec))  # fmt: skip


def run(engine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finished = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return finished
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    raise AssertionError("the engine did not finish")


def assert_valid_json(completion, schema: dict) -> None:
    """A complete output validates against its schema; one cut off by max_tokens reports `length`."""
    if completion.finish_reason == "length":
        return
    assert completion.finish_reason == "stop", completion
    jsonschema.validate(json.loads(completion.text), schema)


def test_constrained_and_free_rows_in_one_batch_leave_the_free_rows_untouched(engine) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=24)
    alone = run(engine, {"free": (chat(engine, PROMPTS[0]), free)})["free"].outputs[0].token_ids
    batch = {f"json{i}": (chat(engine, p), constrained(json_schema=PERSON)) for i, p in enumerate(PROMPTS[:3])}
    batch["free"] = (chat(engine, PROMPTS[0]), free)
    outputs = run(engine, batch)
    assert outputs["free"].outputs[0].token_ids == alone
    for i in range(3):
        completion = outputs[f"json{i}"].outputs[0]
        assert completion.finish_reason == "stop", completion
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_n4_samples_each_follow_the_grammar_from_their_own_state(engine) -> None:
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=64,
                            structured_output=StructuredOutputParams(json_schema=PERSON))  # fmt: skip
    outputs = run(engine, {"n4": (chat(engine, PROMPTS[1]), params)})["n4"].outputs
    assert len(outputs) == 4
    for completion in outputs:
        assert_valid_json(completion, PERSON)
    assert len({c.text for c in outputs}) > 1  # sampled independently, not one matcher shared


def test_a_preempted_constrained_request_keeps_its_accepted_tokens(default_model_dir: Path, engine) -> None:
    prompts = {f"r{i}": (chat(engine, p), constrained(max_tokens=80, json_schema=PERSON)) for i, p in
               enumerate(PROMPTS[:4])}  # fmt: skip
    expected = {rid: out.outputs[0].text for rid, out in run(engine, prompts).items()}
    # 8 blocks of 16 tokens: four sequences of ~50 tokens (3-4 blocks each) do not fit at once.
    small = make_engine(default_model_dir, max_model_len=128, kv_cache_memory_bytes=6 * 2**20)
    outputs = run(small, prompts)
    assert small.stats().num_preemptions > 0
    assert {rid: out.outputs[0].text for rid, out in outputs.items()} == expected


def test_max_tokens_cuts_a_json_with_length_and_stop_strings_still_apply(engine) -> None:
    outputs = run(engine, {
        "short": (chat(engine, PROMPTS[0]), constrained(max_tokens=4, json_schema=PERSON)),
        "stop": (chat(engine, PROMPTS[0]), SamplingParams(
            temperature=0.0, max_tokens=64, stop=[","], structured_output=StructuredOutputParams(json_schema=PERSON)
        )),
    })  # fmt: skip
    assert outputs["short"].outputs[0].finish_reason == "length"
    assert len(outputs["short"].outputs[0].token_ids) == 4
    stopped = outputs["stop"].outputs[0]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", ",") and "," not in stopped.text


def test_regex_and_choice_outputs_match_every_time(engine) -> None:
    regexes = [r"\d{3}-\d{4}", r"(red|green|blue) [a-z]{2,8}", r"[A-Z][a-z]+, [A-Z]{2} \d{5}"]
    choices = ["positive", "negative", "neutral"]
    requests = {}
    for i, prompt in enumerate(PROMPTS):
        requests[f"re{i}"] = (chat(engine, prompt), constrained(32, 1.0, regex=regexes[i % len(regexes)]))
        requests[f"ch{i}"] = (chat(engine, prompt), constrained(8, 1.0, choice=choices))
    outputs = run(engine, requests)
    for i in range(len(PROMPTS)):
        regex_out = outputs[f"re{i}"].outputs[0]
        assert regex_out.finish_reason == "stop" and re.fullmatch(regexes[i % len(regexes)], regex_out.text)
        assert outputs[f"ch{i}"].outputs[0].text in choices


def test_json_object_gives_an_object(engine) -> None:
    completion = run(engine, {"o": (chat(engine, PROMPTS[2]), constrained(96, json_object=True))})["o"].outputs[0]
    assert_valid_json(completion, {"type": "object"})


def test_a_grammar_that_does_not_compile_fails_only_its_request(engine) -> None:
    outputs = run(engine, {
        "bad": (chat(engine, "hi"), constrained(regex="([a-z")),
        "good": (chat(engine, "hi"), SamplingParams(temperature=0.0, max_tokens=4)),
    })  # fmt: skip
    assert "structured_output: the regex does not compile" in outputs["bad"].error
    assert outputs["bad"].outputs[0].finish_reason == "abort"
    assert outputs["good"].error is None and len(outputs["good"].outputs[0].token_ids) == 4


def test_an_oversized_grammar_is_refused_at_once(default_model_dir: Path) -> None:
    engine = make_engine(default_model_dir, max_model_len=256, max_structured_output_bytes=100)
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(20)}}
    with pytest.raises(RequestError, match="bytes; this server accepts at most 100") as error:
        engine.add_request("big", "hi", constrained(json_schema=big))
    assert error.value.param == "structured_output"


def test_async_engine_refuses_a_schema_that_does_not_compile_before_queueing(engine) -> None:
    async_engine = AsyncEngine(engine)

    async def generate() -> None:
        spec = StructuredOutputParams(grammar="root ::= undefined_rule", param="guided_grammar")
        async for _ in async_engine.generate("g", "hi", SamplingParams(structured_output=spec)):
            pass

    try:
        with pytest.raises(RequestError, match="guided_grammar: the grammar does not compile") as error:
            asyncio.run(generate())
        assert error.value.param == "guided_grammar"
    finally:
        async_engine.shutdown()


def test_a_grammar_with_no_allowed_first_token_is_refused_before_queueing(engine) -> None:
    # It compiles, but no token of the vocabulary spells an unassigned plane-4 character (found by the API fuzzer,
    # which got a 500 for it): a bad spec, refused like one that does not compile, and the engine keeps serving.
    async_engine = AsyncEngine(engine)

    async def generate(request_id: str, params: SamplingParams) -> list:
        return [output async for output in async_engine.generate(request_id, "hi", params)]

    try:
        spec = StructuredOutputParams(regex="\U00040000", param="guided_regex")
        with pytest.raises(RequestError, match="guided_regex: the regex allows no token") as error:
            asyncio.run(generate("dead-start", SamplingParams(structured_output=spec, max_tokens=8)))
        assert error.value.param == "guided_regex"
        outputs = asyncio.run(generate("after", SamplingParams(temperature=0.0, max_tokens=3)))
        assert outputs[-1].finished and outputs[-1].error is None
    finally:
        async_engine.shutdown()


class _DeadMatcher:
    """A matcher that accepts a token and then allows nothing."""

    def accept_token(self, token_id: int) -> bool:
        return True

    def is_terminated(self) -> bool:
        return False

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        bitmask.zero_()


def test_a_dead_grammar_state_ends_the_request_with_an_error(engine) -> None:
    engine.add_request("dead", chat(engine, "hi"), constrained(32, json_schema=PERSON))
    outputs = []
    while not engine.requests["dead"].seqs[0].grammar.ready or not engine.requests["dead"].seqs[0].num_computed_tokens:
        outputs += engine.step()
    engine.requests["dead"].seqs[0].grammar.matcher = _DeadMatcher()
    for _ in range(5):
        outputs += engine.step()
    final = [o for o in outputs if o.finished]
    assert len(final) == 1 and "dead state" in final[0].error
    assert final[0].error_status == 400  # the grammar's fault, not the engine's: the router answers 400
    assert not engine.has_unfinished()


# --- hypothesis: JSON schemas within the supported subset ---------------------------------------------------------

_LEAVES = st.one_of(
    st.just({"type": "string", "maxLength": 12}),
    st.just({"type": "boolean"}),
    st.just({"type": "number"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-100, 100), st.integers(0, 1000)),  # fmt: skip
    st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta"]), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
)
_NAMES = st.sampled_from(["id", "name", "tags", "score", "ok", "kind", "city", "year"])


def _objects(values: st.SearchStrategy) -> st.SearchStrategy:
    def build(props: dict, required_flags: list[bool]) -> dict:
        names = list(props)
        required = [n for n, flag in zip(names, required_flags) if flag]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    return st.dictionaries(_NAMES, values, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.booleans(), min_size=len(props), max_size=len(props)).map(
            lambda flags: build(props, flags)
        )
    )


_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        _objects(inner), st.builds(lambda items: {"type": "array", "items": items, "maxItems": 3}, inner)
    ),
    max_leaves=4,
)
SCHEMAS = _objects(_VALUES)
_EXAMPLES = itertools.count()


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schemas=st.lists(SCHEMAS, min_size=4, max_size=4), temperature=st.sampled_from([0.0, 1.0]))
def test_generated_schemas_always_give_valid_json_or_a_clean_length_finish(engine, schemas, temperature) -> None:
    # Ids unique per example: an example that fails leaves its requests behind in the module's engine.
    ids = [f"s{next(_EXAMPLES)}-{i}" for i in range(len(schemas))]
    requests = {
        request_id: (chat(engine, f"Fill in this JSON schema: {json.dumps(schema)}"),
                     constrained(96, temperature, json_schema=schema))
        for request_id, schema in zip(ids, schemas)
    }  # fmt: skip
    outputs = run(engine, requests)
    for request_id, schema in zip(ids, schemas):
        assert outputs[request_id].error is None
        assert_valid_json(outputs[request_id].outputs[0], schema)
