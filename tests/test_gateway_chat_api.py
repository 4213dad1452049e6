"""The chat API apps use, through the gateway with the official openai client: tools, structured output,
logprobs, n, penalties, cached-token usage; and the 400s that name what QMesh cannot do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from meshkit import MODEL, BrokerThread, GatewayThread, worker_threads
from qmesh.gateway.bridge import Bridge

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather today in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris today?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def api() -> Iterator[openai.OpenAI]:
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=1, slots=2) as _,
        GatewayThread(Bridge(broker.endpoint, connect_timeout=5)) as front,
    ):
        yield front.client()


def _stream(api: openai.OpenAI, **request: Any) -> list[Any]:
    return list(
        api.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **request)
    )


# ------------------------------------------------------------------------------------------------ tools


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_required_tool_call_has_arguments_that_match_the_schema_then_the_result_gets_a_reply(api, stream):
    request: dict[str, Any] = {"messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "required", "temperature": 0}
    if stream:
        chunks = _stream(api, max_tokens=80, **request)
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["tool_calls"] and [d.index for d in deltas] == list(range(len(deltas)))
        calls = [(d.id, d.function.name, d.function.arguments) for d in deltas]
    else:
        answer = api.chat.completions.create(model=MODEL, max_tokens=80, **request)
        (choice,) = answer.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert calls
    for _, name, arguments in calls:
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    made = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]
    results = [{"role": "tool", "tool_call_id": i, "content": "Sunny, 21 degrees."} for i, _, _ in calls]
    history = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": made}, *results]
    reply = api.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=150, temperature=0)
    (choice,) = reply.choices
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


def test_parallel_tool_calls_false_makes_one_call(api):
    answer = api.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    assert len(answer.choices[0].message.tool_calls) == 1


def test_a_named_tool_choice_calls_that_tool(api):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    answer = api.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[other, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather"


def test_tool_choice_none_answers_in_words(api):
    answer = api.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none", max_tokens=12, temperature=0
    )
    (choice,) = answer.choices
    assert choice.message.tool_calls is None and choice.message.content and not choice.message.content.startswith("{")


# ------------------------------------------------------------------------------------------------ structured output


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    ("question", "response_format", "schema"),
    [
        (
            "Describe a person called Ada, aged 36, as JSON.",
            {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
            PERSON,
        ),
        # A small model rambles in free-form JSON: a question whose object it closes quickly (at temperature 0).
        ("Reply with a JSON object with one key, ok, set to true.", {"type": "json_object"}, {"type": "object"}),
    ],
    ids=["json_schema", "json_object"],
)
def test_structured_answers_parse_and_validate(api, stream, question, response_format, schema):
    request = {
        "messages": [{"role": "user", "content": question}],
        "response_format": response_format,
        "max_tokens": 80,
        "temperature": 0,
    }
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in _stream(api, **request) if c.choices)
    else:
        text = api.chat.completions.create(model=MODEL, **request).choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


# ------------------------------------------------------------------------------------------------ scoring, n, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_logprobs_with_two_alternatives(api, stream):
    request = {"messages": [{"role": "user", "content": "Count: one, two,"}], "logprobs": True, "top_logprobs": 2}
    if stream:
        chunks = _stream(api, max_tokens=5, **request)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        tokens = chunks[-1].usage.completion_tokens
    else:
        answer = api.chat.completions.create(model=MODEL, max_tokens=5, **request)
        entries, tokens = answer.choices[0].logprobs.content, answer.usage.completion_tokens
    assert len(entries) == tokens > 0  # one entry per generated token
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert max(top.logprob for top in entry.top_logprobs) >= entry.logprob - 1e-6


def test_completions_logprobs_in_the_legacy_shape(api):
    answer = api.completions.create(model=MODEL, prompt="One, two,", max_tokens=3, logprobs=2, temperature=0)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and len(logprobs.token_logprobs) == 3 and len(logprobs.top_logprobs[0]) == 2
    assert "".join(logprobs.tokens) == answer.choices[0].text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_n_gives_indexed_choices_and_summed_usage(api, stream):
    request = {"messages": [{"role": "user", "content": "Name a colour."}], "n": 2, "seed": 7, "temperature": 1.0}
    if stream:
        chunks = _stream(api, max_tokens=6, **request)
        indexes = {c.choices[0].index for c in chunks if c.choices}
        finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert indexes == {0, 1} and sorted(finishes) == [0, 1]
    else:
        answer = api.chat.completions.create(model=MODEL, max_tokens=6, **request)
        assert [choice.index for choice in answer.choices] == [0, 1]
        usage = answer.usage
    assert usage.completion_tokens > 6 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_penalties_bias_and_sampling_fields_are_carried(api):
    answer = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"28": -100},
        seed=3,
        stop=["\n\n"],
        extra_body={"top_k": 20, "min_p": 0.05},
    )
    assert answer.choices[0].message.content
    # Two of them with an effect to see, against the greedy answer: a token biased to +100 is every token; a stop
    # sequence taken from the answer cuts it there.
    greedy = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0}
    plain = api.chat.completions.create(**greedy, max_tokens=8).choices[0].message.content
    biased = api.chat.completions.create(**greedy, max_tokens=6, logit_bias={"5000": 100}).choices[0].message.content
    piece = biased[: len(biased) // 6]
    assert piece.strip() and biased == piece * 6 and biased != plain[: len(biased)], biased
    word = plain.split()[1]
    cut = api.chat.completions.create(**greedy, max_tokens=8, stop=[word]).choices[0]
    assert cut.message.content == plain[: plain.index(word)] and cut.finish_reason == "stop", (plain, word)


def test_a_repeated_long_prompt_reports_cached_tokens(api):
    prompt = [{"role": "user", "content": "Summarise: " + "The sea is calm and the sky is clear. " * 30}]
    api.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2)
    again = api.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 100


# ------------------------------------------------------------------------------------------------ the 400s


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
            None,
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
                "tool_choice": "required",
            },
            None,
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 99}, "n"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "nope"}]}, None),
    ],
    ids=[
        "bad-schema",
        "broken-tool-schema",
        "not-a-function",
        "choice-without-tools",
        "audio",
        "top-logprobs",
        "n",
        "orphan-tool-result",
    ],
)
def test_what_qmesh_cannot_do_is_a_400_that_says_what(api, request_fields, param):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **request_fields}
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, **request)
    if param is not None:
        assert caught.value.body["param"] == param, caught.value.body
    else:
        message = caught.value.body["message"]
        assert "schema" in message or "tool" in message, message
