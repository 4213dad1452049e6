"""Tool calls for models without tool support (worker/tools.py): the schema, the prompt, the answer's decoding."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from qmesh.common.bodies import GenerationRequest
from qmesh.worker.tools import ContentDecoder, answer_schema, parse_answer, tool_messages

WEATHER = {
    "name": "weather",
    "description": "Today's weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {"name": "time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}


def request(**fields) -> GenerationRequest:
    question = [{"role": "user", "content": "Weather in Paris?"}]
    return GenerationRequest(messages=question, tools=[WEATHER, TIME], **fields)


def test_auto_allows_a_reply_or_calls_and_required_only_calls() -> None:
    auto = answer_schema(request())
    reply, calls = auto["anyOf"]
    assert reply["required"] == ["content"] and calls["required"] == ["tool_calls"]
    names = [item["properties"]["name"]["const"] for item in calls["properties"]["tool_calls"]["items"]["anyOf"]]
    assert names == ["weather", "time"]
    required = answer_schema(request(tool_choice="required"))
    assert required["required"] == ["tool_calls"] and "maxItems" not in required["properties"]["tool_calls"]


def test_a_named_choice_allows_one_call_of_that_tool_with_its_parameters() -> None:
    schema = answer_schema(request(tool_choice={"name": "time"}))
    calls = schema["properties"]["tool_calls"]
    (only,) = calls["items"]["anyOf"]
    assert calls["maxItems"] == 1 and only["properties"]["name"]["const"] == "time"
    assert only["properties"]["arguments"] == TIME["parameters"]
    assert answer_schema(request(parallel_tool_calls=False))["anyOf"][1]["properties"]["tool_calls"]["maxItems"] == 1


def test_past_calls_and_results_are_shown_in_the_answers_shape() -> None:
    calls = [{"id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'}]
    history = GenerationRequest(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "c1"},
        ],
        system="Be brief.",
        tools=[WEATHER],
    )
    system, user, assistant, result = tool_messages(history, describe=True)
    assert system["content"].startswith("Be brief.") and "weather: Today's weather" in system["content"]
    assert json.loads(assistant["content"]) == {"tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]}
    assert result == {"role": "user", "content": "Result of weather: sunny, 21 C"}
    assert "Tools:" not in tool_messages(history, describe=False)[0]["content"]


def test_an_answer_is_a_reply_or_calls_with_fresh_ids_and_arguments_as_json_text() -> None:
    assert parse_answer('{"content": "Hello"}') == ("Hello", None)
    reply, calls = parse_answer('{ "tool_calls": [ {"name": "weather", "arguments": {"city": "Paris"}} ] }')
    assert reply is None and calls is not None
    (call,) = calls
    assert call["name"] == "weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["id"].startswith("call_")
    assert parse_answer('{"content": "cut sh') == ("cut sh", None)  # max_tokens reached mid-answer


@given(st.text(), st.lists(st.integers(1, 7), min_size=1, max_size=40))
def test_a_reply_is_decoded_exactly_however_its_json_is_cut_into_pieces(reply: str, cuts: list[int]) -> None:
    answer = json.dumps({"content": reply}, ensure_ascii=True)  # escapes, \\u sequences, surrogate pairs
    decoder, out, at = ContentDecoder(), [], 0
    for cut in cuts * (len(answer) // sum(cuts) + 1):
        out.append(decoder.feed(answer[at : at + cut]))
        at += cut
        if at >= len(answer):
            break
    assert "".join(out) == reply


def test_calls_give_no_text() -> None:
    decoder = ContentDecoder()
    assert decoder.feed('{\n  "tool_calls": [{"name": "weather", ') == "" and decoder.feed('"arguments": {}}]}') == ""
