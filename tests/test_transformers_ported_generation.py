"""Ports of transformers' ``GenerationTesterMixin`` (tests/generation/test_utils.py) as
``FastVlmForConditionalGenerationModelTest`` runs it, on the model tester's tiny config.

The originals check shapes and output types; here transformers' ``generate`` on the same
weights also gives the expected tokens (and, with a shared seed, the same samples).
Decoding methods we do not implement are asserted to fail with one line naming the option.
Each test names its original.
"""

from __future__ import annotations

import pytest
import torch

from fastvlm import FastVLM
from fastvlm.errors import InputError
from ported_tester import (
    MAX_NEW_TOKENS,
    TEXT_CONFIG,
    beam_kwargs,
    build_pair,
    inputs_for_generate,
    logits_processor_kwargs,
)

torch.set_grad_enabled(False)
TOL = 1e-4
VOCAB = TEXT_CONFIG["vocab_size"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("ported_generation"))


def both(pair, seed: int | None = None, **kwargs):
    """Our generate and transformers', each after the same seed when one is given."""
    inputs = {**inputs_for_generate(), **kwargs}
    if seed is not None:
        torch.manual_seed(seed)
    ours = pair.ours.generate(**inputs)
    if seed is not None:
        torch.manual_seed(seed)
    return ours, pair.ref.generate(**inputs)


def prompt_length() -> int:
    return inputs_for_generate()["input_ids"].shape[-1]


def check_outputs(out, batch: int, num_return_sequences: int = 1, num_beams: int = 1) -> None:
    """GenerationTesterMixin._check_outputs, for what we return: one (rows, vocab) score and
    logit tensor per new token; no attentions, hidden states or cache."""
    rows = batch * (num_beams if num_beams > 1 else num_return_sequences)
    assert out.sequences.shape == (batch * num_return_sequences, prompt_length() + MAX_NEW_TOKENS)
    for name in ("scores", "logits"):
        steps = getattr(out, name)
        assert len(steps) == MAX_NEW_TOKENS
        assert all(step.shape == (rows, VOCAB) for step in steps)
    assert out.attentions is None and out.hidden_states is None and out.past_key_values is None


def assert_close_steps(got, expected) -> None:
    for a, b in zip(got, expected, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        torch.testing.assert_close(a[finite], b[finite], atol=TOL, rtol=TOL)


def test_greedy_generate(pair):
    """GenerationTesterMixin.test_greedy_generate."""
    ours, theirs = both(
        pair, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, **logits_processor_kwargs()
    )
    assert ours.shape[-1] == MAX_NEW_TOKENS + prompt_length()
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("use_cache", [False, True])
def test_greedy_generate_dict_outputs(pair, use_cache):
    """GenerationTesterMixin.test_greedy_generate_dict_outputs (use_cache=False) and
    test_greedy_generate_dict_outputs_use_cache."""
    kwargs = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW_TOKENS,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=use_cache,
        **logits_processor_kwargs(),
    )
    ours, theirs = both(pair, **kwargs)
    assert type(ours).__name__ == "GenerateDecoderOnlyOutput"
    check_outputs(ours, batch=2)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    assert_close_steps(ours.scores, theirs.scores)
    assert_close_steps(ours.logits, theirs.logits)


def test_sample_generate(pair):
    """GenerationTesterMixin.test_sample_generate (same seed: the same samples as transformers)."""
    kwargs = dict(do_sample=True, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, **logits_processor_kwargs(True))
    ours, theirs = both(pair, seed=0, **kwargs)
    assert ours.shape[-1] == MAX_NEW_TOKENS + prompt_length()
    assert ours.tolist() == theirs.tolist()


def test_sample_generate_dict_output(pair):
    """GenerationTesterMixin.test_sample_generate_dict_output (num_return_sequences=2)."""
    kwargs = dict(
        do_sample=True,
        num_beams=1,
        max_new_tokens=MAX_NEW_TOKENS,
        num_return_sequences=2,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=False,
        **logits_processor_kwargs(True),
    )
    ours, theirs = both(pair, seed=0, **kwargs)
    assert type(ours).__name__ == "GenerateDecoderOnlyOutput"
    check_outputs(ours, batch=2, num_return_sequences=2)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    assert_close_steps(ours.scores, theirs.scores)


def test_beam_search_generate(pair):
    """GenerationTesterMixin.test_beam_search_generate."""
    kwargs = dict(
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **beam_kwargs(), **logits_processor_kwargs()
    )
    ours, theirs = both(pair, **kwargs)
    assert ours.shape[-1] == MAX_NEW_TOKENS + prompt_length()
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("use_cache", [False, True])
def test_beam_search_generate_dict_output(pair, use_cache):
    """GenerationTesterMixin.test_beam_search_generate_dict_output (use_cache=False) and
    test_beam_search_generate_dict_outputs_use_cache."""
    kwargs = dict(
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=use_cache,
        **beam_kwargs(),
        **logits_processor_kwargs(),
    )
    ours, theirs = both(pair, **kwargs)
    assert type(ours).__name__ == "GenerateBeamDecoderOnlyOutput"
    check_outputs(ours, batch=2, num_beams=2)
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=TOL, rtol=TOL)
    assert ours.beam_indices.tolist() == theirs.beam_indices.tolist()


def test_beam_search_num_return_sequences(pair):
    """GenerationTesterMixin.test_beam_search_generate with num_return_sequences=2
    (_get_beam_kwargs(num_return_sequences=2), as the constrained and group variants use)."""
    kwargs = dict(
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **beam_kwargs(2), **logits_processor_kwargs()
    )
    ours, theirs = both(pair, **kwargs)
    assert ours.shape == (4, MAX_NEW_TOKENS + prompt_length())
    assert ours.tolist() == theirs.tolist()


def test_beam_sample_generate(pair):
    """GenerationTesterMixin.test_beam_sample_generate and test_beam_sample_generate_dict_output."""
    kwargs = dict(
        do_sample=True,
        max_new_tokens=MAX_NEW_TOKENS,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        **beam_kwargs(),
        **logits_processor_kwargs(True),
    )
    ours, theirs = both(pair, seed=0, **kwargs)
    assert type(ours).__name__ == "GenerateBeamDecoderOnlyOutput"
    check_outputs(ours, batch=2, num_beams=2)
    assert ours.sequences.tolist() == theirs.sequences.tolist()


def test_left_padding_compatibility(pair):
    """GenerationTesterMixin.test_left_padding_compatibility: left padding (mask 0, positions
    from the mask) leaves the next-token logits and the greedy tokens unchanged."""
    inputs = inputs_for_generate()
    ids, mask = inputs["input_ids"], torch.ones_like(inputs["input_ids"])
    pad = torch.full((ids.shape[0], 32), TEXT_CONFIG["pad_token_id"])
    padded_ids, padded_mask = torch.cat([pad, ids], 1), torch.cat([torch.zeros_like(pad), mask], 1)
    positions = (padded_mask.cumsum(-1) - 1).clamp(min=0)
    px = inputs["pixel_values"]
    plain = pair.ours(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, -1]
    padded = pair.ours(
        input_ids=padded_ids, attention_mask=padded_mask, pixel_values=px, position_ids=positions
    )
    torch.testing.assert_close(padded.logits[:, -1], plain, atol=1e-5, rtol=1e-5)
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    a = pair.ours.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **greedy)
    b = pair.ours.generate(input_ids=padded_ids, attention_mask=padded_mask, pixel_values=px, **greedy)
    assert a[:, -MAX_NEW_TOKENS:].tolist() == b[:, -MAX_NEW_TOKENS:].tolist()


def test_generate_from_inputs_embeds(pair):
    """GenerationTesterMixin.test_generate_from_inputs_embeds: ids plus their embeddings give
    the ids' tokens; embeddings alone return only the new tokens, as in transformers."""
    ids = inputs_for_generate()["input_ids"].clamp(min=2)  # text only: no image tokens
    embeds = pair.ref.get_input_embeddings()(ids)
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    from_ids = pair.ours.generate(input_ids=ids, **greedy)
    with_embeds = pair.ours.generate(input_ids=ids, inputs_embeds=embeds, **greedy)
    assert with_embeds.tolist() == from_ids.tolist()
    only_embeds = pair.ours.generate(inputs_embeds=embeds, **greedy)
    assert only_embeds.tolist() == pair.ref.generate(inputs_embeds=embeds, **greedy).tolist()
    assert only_embeds.tolist() == from_ids[:, ids.shape[1] :].tolist()


def test_generate_with_static_cache(pair):
    """GenerationTesterMixin.test_generate_with_static_cache: cache_implementation="static"
    gives the tokens of the default cache (ours is always preallocated, so it is accepted)."""
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    static = pair.ours.generate(**inputs_for_generate(), cache_implementation="static", **greedy)
    assert static.tolist() == pair.ours.generate(**inputs_for_generate(), **greedy).tolist()


def test_model_parallel_beam_search(pair):
    """GenerationTesterMixin.test_model_parallel_beam_search: a model loaded with
    device_map="auto" runs beam search (one device here)."""
    model = FastVLM.from_pretrained(pair.folder, device_map="auto", dtype=torch.float32, progress=False)
    out = model.generate(**inputs_for_generate(), max_new_tokens=MAX_NEW_TOKENS, num_beams=2)
    assert out.shape[-1] == prompt_length() + MAX_NEW_TOKENS


@pytest.mark.parametrize(
    ("original", "kwargs", "named"),
    [
        (
            "test_greedy_generate_dict_outputs (output_attentions)",
            {"output_attentions": True},
            "output_attentions",
        ),
        (
            "test_greedy_generate_dict_outputs (output_hidden_states)",
            {"output_hidden_states": True},
            "output_hidden_states",
        ),
        (
            "test_group_beam_search_generate",
            {"num_beams": 2, "num_beam_groups": 2, "diversity_penalty": 2.0},
            "num_beam_groups",
        ),
        (
            "test_constrained_beam_search_generate",
            {"num_beams": 4, "force_words_ids": [[5]]},
            "force_words_ids",
        ),
        ("test_contrastive_generate", {"penalty_alpha": 0.6, "top_k": 5}, "penalty_alpha"),
        ("test_assisted_decoding_matches_greedy_search", {"assistant_model": object()}, "assistant_model"),
        (
            "test_prompt_lookup_decoding_matches_greedy_search",
            {"prompt_lookup_num_tokens": 2},
            "prompt_lookup",
        ),
        ("test_dola_decoding_sample", {"dola_layers": "low"}, "dola_layers"),
        ("test_generate_continue_from_past_key_values", {"past_key_values": object()}, "past_key_values"),
    ],
)
def test_unimplemented_decoding_methods_fail_in_one_line(pair, original, kwargs, named):
    """The GenerationTesterMixin tests of decoding methods we deliberately leave out (see
    each id): generate refuses the option by name, in one line, before any work."""
    with pytest.raises(InputError, match=named) as info:
        pair.ours.generate(**inputs_for_generate(), max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    assert "\n" not in str(info.value)


def test_generate_without_input_ids(pair):
    """GenerationTesterMixin.test_generate_without_input_ids: skipped there when the config
    has no bos token (this one has none); here nothing to start from is one clear error."""
    with pytest.raises(InputError) as info:
        pair.ours.generate(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert "\n" not in str(info.value)
