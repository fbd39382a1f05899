"""An OpenAI request body -> the engine's request: every honoured field arrives under the
engine's name, and nothing that would change the answer is dropped."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastvlm.generation.constraint_spec import OutputConstraint
from fastvlm.server.errors import APIError
from fastvlm.server.schemas import ChatCompletionRequest
from fastvlm.server.translate import Policy, to_generation_request

POLICY = Policy("m", context_length=256, vocab_size=1000, max_choices=4)


def translate(policy: Policy = POLICY, **fields):
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}
    )
    return asyncio.run(to_generation_request(body, policy))


def test_defaults_change_nothing():
    request = translate()
    assert request.constraint is None and request.n == 1
    assert not request.logprobs and request.top_logprobs == 0
    s = request.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (0.0, 0.0, None)


def test_every_extra_reaches_the_engine():
    request = translate(
        n=3, logprobs=True, top_logprobs=5, presence_penalty=0.5, frequency_penalty=-1,
        logit_bias={"17": 100, " 42": -3.5}, seed=9,
    )  # fmt: skip
    assert (request.n, request.logprobs, request.top_logprobs) == (3, True, 5)
    s = request.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.seed) == (0.5, -1.0, 9)
    assert dict(s.logit_bias) == {17: 100.0, 42: -3.5}


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
NAMED = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": False}}


@pytest.mark.parametrize(
    "fields, want",
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, OutputConstraint.json_object()),
        ({"response_format": NAMED}, OutputConstraint.json_schema(SCHEMA)),
        ({"guided_json": SCHEMA}, OutputConstraint.json_schema(SCHEMA)),
        ({"guided_json": json.dumps(SCHEMA)}, OutputConstraint.json_schema(SCHEMA)),
        ({"guided_regex": "[a-z]+"}, OutputConstraint.regex("[a-z]+")),
        ({"guided_choice": ["yes", "no"]}, OutputConstraint.choice(["yes", "no"])),
        ({"response_format": {"type": "text"}, "guided_choice": ["yes"]}, OutputConstraint.choice(["yes"])),
    ],
)  # fmt: skip
def test_constraints(fields, want):
    assert translate(**fields).constraint == want


def test_the_compiler_is_asked_and_its_refusal_names_the_field():
    from fastvlm.errors import InputError

    seen = []

    def compile_or_refuse(constraint):
        seen.append(constraint)
        if constraint.kind == "regex":
            raise InputError("cannot enforce this regex: look-around")

    policy = Policy("m", context_length=256, check_constraint=compile_or_refuse)
    assert translate(policy, guided_choice=["a"]).constraint == seen[0]
    with pytest.raises(APIError) as info:
        translate(policy, guided_regex="(?=a)a")
    assert info.value.status == 400 and info.value.param == "guided_regex"
    assert "look-around" in info.value.message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 5}, "n"),  # more than the engine's batch
        ({"top_logprobs": 1}, "top_logprobs"),
        ({"logit_bias": {"1000": 1}}, "logit_bias"),  # past the vocabulary
        ({"logit_bias": {"1e3": 1}}, "logit_bias"),
        ({"logit_bias": {"": 1}}, "logit_bias"),
        ({"guided_json": "3"}, "guided_json"),
        ({"guided_json": {"type": "string", "nullable": True}}, "guided_json"),
        ({"guided_json": {"x": "y" * 100_001}}, "guided_json"),
        ({"guided_regex": "a", "guided_json": {}}, "guided_regex"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"guided_grammar": "root ::= x"}, "guided_grammar"),
    ],
)
def test_refused_with_the_field(fields, param):
    with pytest.raises(APIError) as info:
        translate(**fields)
    assert info.value.status == 400 and info.value.param == param, info.value.message
