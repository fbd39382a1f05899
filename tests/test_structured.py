"""Constrained decoding in the engine, on a tiny random-weight model.

A random-weight model writes gibberish, so every valid answer it gives under a
constraint is the constraint's doing: the tests sample at temperature 1 with several
seeds and check every answer that completed ("stop") parses and validates.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from fastvlm import FastVLM
from fastvlm.errors import InputError
from fastvlm.generation import engine as engine_module
from fastvlm.generation.constraint_spec import OutputConstraint
from fastvlm.generation.constraints import GrammarCompiler
from fastvlm.generation.engine import Engine, GenerationRequest
from fastvlm.generation.sampling import SamplingParams
from fastvlm.processing import FastVLMProcessor

SEEDS = range(6)
NESTED = {
    "type": "object",
    "properties": {
        "person": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["person", "ok"],
    "additionalProperties": False,
}
ARRAY = {
    "type": "object",
    "properties": {
        "xs": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 2,
            "maxItems": 4,
        }
    },
    "required": ["xs"],
    "additionalProperties": False,
}
ENUM_BOOL = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "none": {"type": "null"},
    },
    "required": ["color", "ok", "none"],
    "additionalProperties": False,
}
NUMBERS = {
    "type": "object",
    "properties": {"total": {"type": "number", "minimum": 0, "maximum": 100}, "count": {"type": "integer"}},
    "required": ["total", "count"],
    "additionalProperties": False,
}
ITEMS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"label": {"type": "string", "maxLength": 4}, "score": {"enum": [1, 2, 3]}},
        "required": ["label", "score"],
        "additionalProperties": False,
    },
    "minItems": 1,
    "maxItems": 3,
}
SCHEMAS = {"nested": NESTED, "array": ARRAY, "enum_bool": ENUM_BOOL, "numbers": NUMBERS, "items": ITEMS}


@pytest.fixture(scope="module")
def model_and_processor(tiny_checkpoint_dir):
    folder = tiny_checkpoint_dir
    model = FastVLM.from_pretrained(folder, dtype="float32", device="cpu", progress=False)
    return model, FastVLMProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def engine(model_and_processor):
    return Engine(*model_and_processor, max_batch=8, max_seq_len=256)


def request(constraint=None, *, seed=None, temperature=1.0, max_new_tokens=64, text="Describe it.", **kw):
    sampling = SamplingParams(temperature=temperature if seed is not None else 0.0, seed=seed)
    messages = [{"role": "user", "content": text}]
    return GenerationRequest(messages, max_new_tokens, sampling, constraint=constraint, **kw)


def sampled(engine, constraint, max_new_tokens=64):
    return engine.generate([request(constraint, seed=s, max_new_tokens=max_new_tokens) for s in SEEDS])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_completed_answer_validates(engine, name):
    schema = SCHEMAS[name]
    results = sampled(engine, OutputConstraint.json_schema(schema))
    done = [r for r in results if r.finish_reason == "stop"]
    assert len(done) >= len(results) // 2, [r.text for r in results]
    for r in done:
        jsonschema.validate(json.loads(r.text), schema)
    for r in results:
        assert r.finish_reason in ("stop", "length")
        assert r.text.startswith("[" if schema["type"] == "array" else "{")
        assert "\n" not in r.text and "  " not in r.text  # compact: no whitespace to run away in


@pytest.mark.slow
def test_pydantic_model_class(engine):
    pydantic = pytest.importorskip("pydantic")

    class Receipt(pydantic.BaseModel):
        paid: bool
        currency: str = pydantic.Field(max_length=3)

    constraint = OutputConstraint.json_schema(Receipt)
    done = [r for r in sampled(engine, constraint) if r.finish_reason == "stop"]
    assert done
    for r in done:
        Receipt.model_validate_json(r.text)


@pytest.mark.slow
def test_json_object(engine):
    results = sampled(engine, OutputConstraint.json_object(), max_new_tokens=32)
    for r in results:
        assert r.text.startswith("{")
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.text), dict)


def test_choice(engine):
    choices = ["yes", "no", 'maybe "so"']
    results = sampled(engine, OutputConstraint.choice(choices))
    assert all(r.finish_reason == "stop" and r.text in choices for r in results)
    assert len({r.text for r in results}) > 1  # the seeds pick, the grammar only restricts


@pytest.mark.slow
def test_regex(engine):
    pattern = r"[a-z]{2,5}-[0-9]{1,3}"
    results = sampled(engine, OutputConstraint.regex(pattern))
    assert sum(r.finish_reason == "stop" for r in results) >= len(results) // 2
    for r in results:
        if r.finish_reason == "stop":
            assert re.fullmatch(pattern, r.text), r.text


@pytest.mark.slow
@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_mixed_batch_matches_each_alone(model_and_processor, seeded):
    """Constrained and free rows decode in the same steps; each gets what it gets alone."""
    constraints = [OutputConstraint.json_schema(NESTED), None, OutputConstraint.choice(["a", "b"]), None]
    constraints += [OutputConstraint.regex("[0-9]{3}"), OutputConstraint.json_schema(ARRAY)]
    reqs = [request(c, seed=i if seeded else None, max_new_tokens=40) for i, c in enumerate(constraints)]
    together = Engine(*model_and_processor, max_batch=8, max_seq_len=256).generate(reqs)
    alone = Engine(*model_and_processor, max_batch=1, max_seq_len=256)
    for req, got in zip(reqs, together, strict=True):
        want = alone.generate([request(req.constraint, seed=req.sampling.seed, max_new_tokens=40)])[0]
        assert (got.text, got.finish_reason, got.token_ids) == (want.text, want.finish_reason, want.token_ids)


def test_streaming_and_budget(engine):
    constraint = OutputConstraint.json_schema(NESTED)
    pieces = list(engine.stream(request(constraint, max_new_tokens=40)))
    whole = engine.generate([request(constraint, max_new_tokens=40)])[0]
    assert "".join(pieces) == whole.text
    cut = engine.generate([request(constraint, max_new_tokens=3)])[0]
    assert cut.finish_reason == "length" and whole.text.startswith(cut.text)


def test_stop_strings_and_penalty_still_apply(engine):
    constraint = OutputConstraint.json_schema(ENUM_BOOL)
    cut = engine.generate([request(constraint, stop=['"ok"'])])[0]
    assert cut.finish_reason == "stop" and cut.text.startswith('{"color": ') and '"ok"' not in cut.text
    penalised = request(constraint, max_new_tokens=40)
    penalised.sampling = SamplingParams(temperature=1.0, seed=1, repetition_penalty=1.3)
    result = engine.generate([penalised])[0]
    if result.finish_reason == "stop":
        jsonschema.validate(json.loads(result.text), ENUM_BOOL)


@pytest.mark.parametrize(
    "constraint, named",
    [
        ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
        ({"type": "string", "nullable": True}, "'nullable'"),
        ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "'not' at #/properties/a"),
        ({"type": "string", "x-guidance": {"whitespace_flexible": True}}, "'x-guidance'"),
        ({"type": "string", "format": "bogus"}, "Unknown format: bogus"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ("a(?=b)", "look-around"),
        ("(a|b)\\1", "backreferences"),
    ],
)
def test_unenforceable_constraint_is_one_line_input_error(engine, constraint, named):
    """Keywords are refused when the constraint is made, what only the compiler finds in prepare."""
    with pytest.raises(InputError) as info:
        make = OutputConstraint.json_schema if isinstance(constraint, dict) else OutputConstraint.regex
        engine.prepare(request(make(constraint)))
    assert named in str(info.value) and "\n" not in str(info.value)
    assert not engine.has_work


def test_constraint_spec_checks_its_input():
    for make in (
        lambda: OutputConstraint.json_schema(["not", "a", "dict"]),
        lambda: OutputConstraint.json_schema({"bad": {1, 2}}),
        lambda: OutputConstraint.regex(""),
        lambda: OutputConstraint.choice([]),
        lambda: OutputConstraint.from_options(regex="a", choices=["b"]),
    ):
        with pytest.raises(InputError):
            make()
    schema = {"type": "object"}
    a = OutputConstraint.json_schema(schema)
    schema["type"] = "array"  # the constraint keeps its own copy
    assert a == OutputConstraint.json_object() or a.schema == {"type": "object"}
    assert hash(a) == hash(OutputConstraint.json_schema({"type": "object"}))
    assert OutputConstraint.choice(["x"]).parse("x") == "x"


@pytest.mark.slow
def test_compiled_grammars_are_cached_and_bounded(model_and_processor):
    model, processor = model_and_processor
    compiler = GrammarCompiler(processor.tokenizer, model.config.text.vocab_size, [151645], cache_size=2)
    first = compiler.compile(OutputConstraint.choice(["a"]))
    assert compiler.compile(OutputConstraint.choice(["a"])) is first
    compiler.compile(OutputConstraint.choice(["b"]))
    compiler.compile(OutputConstraint.choice(["c"]))
    assert compiler.compile(OutputConstraint.choice(["a"])) is not first  # evicted


def test_free_rows_build_no_masks(engine, monkeypatch):
    def boom(*_):
        raise AssertionError("an unconstrained step built a mask")

    monkeypatch.setattr(engine_module, "allowed_masks", boom)
    assert engine.generate([request(max_new_tokens=5)])[0].finish_reason == "length"


# -- the Python API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(tiny_checkpoint_dir):
    import fastvlm

    return fastvlm.load(tiny_checkpoint_dir, device="cpu", dtype="float32", progress=False)


def test_api_ask_chat_batch_give_parsed(vlm):
    answer = vlm.ask(None, "Colour?", json_schema=ENUM_BOOL, max_new_tokens=40, temperature=1.0, seed=0)
    assert isinstance(answer, str) and answer.finish_reason == "stop"
    assert answer.parsed == json.loads(answer) and answer.parsed["color"] in ("red", "green", "blue")
    messages = [{"role": "user", "content": "Pick."}]
    result = vlm.chat(messages, choices=["left", "right"], temperature=1.0, seed=3)
    assert result.parsed == result.text and result.text in ("left", "right")
    assert vlm.chat(messages, max_new_tokens=3).parsed is None  # unconstrained
    assert vlm.chat(messages, json_schema=NESTED, max_new_tokens=3).parsed is None  # cut by its budget
    events = list(vlm.chat(messages, regex="[0-9]{4}", stream=True))
    assert events[-1].result.parsed == "".join(e.text for e in events) and len(events[-1].result.text) == 4
    items = [messages, {"messages": messages, "regex": "(yes|no)"}, {"messages": messages, "choices": ["x"]}]
    results = vlm.batch(items, max_new_tokens=8)
    assert results[0].parsed is None and results[1].parsed in ("yes", "no") and results[2].parsed == "x"


def test_api_refuses_bad_constraints_before_any_work(vlm):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(InputError, match="pick one of json_schema, regex and choices"):
        vlm.chat(messages, regex="a", choices=["b"])
    with pytest.raises(InputError, match="'patternProperties'|'propertyNames'"):
        vlm.ask(None, "Hi", json_schema={"type": "object", "propertyNames": {"maxLength": 2}})
    with pytest.raises(InputError, match="lookarounds not supported"):
        vlm.ask(None, "Hi", regex=r"\bword")
    assert not vlm.engine.has_work


def test_apply_allowed_is_exact_and_leaves_free_rows_alone():
    import torch

    from fastvlm.generation.sampling import apply_allowed

    scores = torch.randn(3, 50)
    mask = torch.rand(50) < 0.3
    out = apply_allowed(scores, [mask, None, ~mask])
    assert torch.equal(out[0], scores[0].masked_fill(~mask, float("-inf")))
    assert torch.equal(out[1], scores[1])
    assert torch.equal(out[2], scores[2].masked_fill(mask, float("-inf")))
    both = apply_allowed(scores[:2], [mask, mask])
    assert torch.equal(both, scores[:2].masked_fill(~mask, float("-inf")))
