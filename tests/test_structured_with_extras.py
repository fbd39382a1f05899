"""Constraints together with the other per-request settings: ``n``, ``logprobs``, penalties.

Each feature is tested on its own elsewhere; these check that they compose: every
choice of a constrained request keeps to the grammar, and logprobs describe the masked
distribution (no probability outside the allowed tokens).
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from fastvlm import FastVLM
from fastvlm.generation.constraint_spec import OutputConstraint
from fastvlm.generation.engine import Engine, GenerationRequest
from fastvlm.generation.sampling import SamplingParams
from fastvlm.processing import FastVLMProcessor

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
    "required": ["label", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_dir):
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype="float32", device="cpu", progress=False)
    return Engine(model, FastVLMProcessor.from_pretrained(tiny_checkpoint_dir), max_batch=8, max_seq_len=256)


def request(constraint, **kwargs) -> GenerationRequest:
    sampling = kwargs.pop("sampling", SamplingParams(temperature=1.0, seed=3))
    return GenerationRequest(
        [{"role": "user", "content": "Fill it in."}], 48, sampling, constraint=constraint, **kwargs
    )


@pytest.mark.slow
def test_every_choice_keeps_to_the_schema(engine):
    results = engine.generate([request(OutputConstraint.json_schema(SCHEMA), n=4)])
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    for r in results:
        assert r.text.startswith("{")
        if r.finish_reason == "stop":
            jsonschema.validate(json.loads(r.text), SCHEMA)
    assert len({r.text for r in results}) > 1  # own matcher and own seed per choice


def test_logprobs_hold_no_mass_outside_the_grammar(engine):
    choices = ["yes", "no"]
    result = engine.generate([request(OutputConstraint.choice(choices), logprobs=True, top_logprobs=20)])[0]
    assert result.text in choices and result.finish_reason == "stop"
    first = result.logprobs[0]
    allowed = [t for t in first.top if math.isfinite(t.logprob)]
    # The first token must start "yes" or "no": a handful of tokens share all the mass.
    assert all(any(c.startswith(t.token) for c in choices) for t in allowed), [t.token for t in allowed]
    assert math.isclose(sum(math.exp(t.logprob) for t in allowed), 1.0, rel_tol=1e-4)


def test_penalties_and_bias_leave_the_grammar_intact(engine):
    sampling = SamplingParams(
        temperature=1.0, seed=5, presence_penalty=1.5, frequency_penalty=1.0, logit_bias={0: 100.0}
    )
    results = engine.generate([request(OutputConstraint.regex("[a-c]{4}"), sampling=sampling, n=2)])
    for r in results:
        assert r.finish_reason == "stop" and len(r.text) == 4 and set(r.text) <= set("abc"), r.text
