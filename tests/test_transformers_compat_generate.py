"""``FastVLM.generate`` against transformers' ``FastVlmForConditionalGeneration.generate``.

The checks of transformers' generation suite (tests/generation/test_utils.py:
``GenerationTesterMixin`` and ``GenerationIntegrationTests``; tests/generation/
test_logits_process.py) that apply to a decoder-only VLM, run on the same tiny random
weights with transformers as the oracle. Each test names the original it comes from.
Tokens must be identical; scores agree to 1e-4 (float32, different kernels).
"""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import transformers

import builders
from fastvlm import FastVLM
from fastvlm.errors import InputError
from fastvlm.generation.generation_config import GenerationConfig
from fastvlm.generation.simple import generate

torch.set_grad_enabled(False)
TOL = 1e-4
N_IMG = (builders.IMAGE_SIZE // 64) ** 2
IMAGE_ID = builders.SMALL_IMAGE_TOKEN_ID
PAD = 0  # the small-vocabulary reference's pad id; its eos is 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = builders.build_reference(seed=11)
    folder = builders.save_reference(ref, tmp_path_factory.mktemp("compat_generate"))
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False)
    return ours, ref, folder


@pytest.fixture(scope="module")
def batch():
    """Two left-padded prompts with one image each, and their pixels."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in (10, 6):
        ids = torch.randint(3, 900, (length,), generator=g)
        rows.append(torch.cat([ids[:2], torch.full((N_IMG,), IMAGE_ID), ids[2:]]))
    T = max(len(r) for r in rows)
    ids = torch.full((2, T), PAD)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    px = torch.rand(2, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": px}


@pytest.fixture(scope="module")
def frequent_token(pair, batch):
    """A token greedy decoding emits early: used as the stop id so that beams finish."""
    ours, _, _ = pair
    out = ours.generate(**batch, max_new_tokens=6, eos_token_id=None)
    return int(out[0, batch["input_ids"].shape[1] + 2])


def both(pair, seed: int | None = None, **kwargs):
    ours, ref, _ = pair
    if seed is not None:
        torch.manual_seed(seed)
    expected = ref.generate(**kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    return ours.generate(**kwargs), expected


def assert_close_tuples(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        assert (a[finite] - b[finite]).abs().max() <= TOL * max(1.0, float(b[finite].abs().max()))


# -- GenerationTesterMixin.test_greedy_generate / test_greedy_generate_dict_outputs ---------
def test_greedy_generate_dict_outputs(pair, batch):
    kwargs = dict(max_new_tokens=7, return_dict_in_generate=True, output_scores=True, output_logits=True)
    got, expected = both(pair, **batch, **kwargs)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert_close_tuples(got.scores, expected.scores)
    assert_close_tuples(got.logits, expected.logits)
    assert both(pair, **batch, max_new_tokens=7)[0].tolist() == expected.sequences.tolist()


# -- GenerationTesterMixin.test_sample_generate / test_sample_generate_dict_output ----------
@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 5, "temperature": 0.7}, {"top_p": 0.8, "num_return_sequences": 3}, {"min_p": 0.05}],
)
def test_sample_generate_with_seed(pair, batch, options):
    kwargs = dict(do_sample=True, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    got, expected = both(pair, seed=7, **batch, **kwargs, **options)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert_close_tuples(got.scores, expected.scores)


# -- GenerationTesterMixin.test_beam_search_generate / test_beam_search_generate_dict_output ----
@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 4},
        {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.6},
        {"num_beams": 4, "num_return_sequences": 4, "early_stopping": True},
        {"num_beams": 2, "early_stopping": "never", "length_penalty": 1.5},
        {"num_beams": 3, "no_repeat_ngram_size": 2, "bad_words_ids": [[5], [7, 8]]},
    ],
)
@pytest.mark.slow
def test_beam_search_generate_dict_output(pair, batch, frequent_token, options):
    kwargs = dict(max_new_tokens=8, eos_token_id=frequent_token, pad_token_id=PAD)
    kwargs.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    got, expected = both(pair, **batch, **kwargs, **options)
    assert got.sequences.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, atol=TOL, rtol=TOL)
    assert got.beam_indices.tolist() == expected.beam_indices.tolist()
    assert_close_tuples(got.scores, expected.scores)
    assert_close_tuples(got.logits, expected.logits)
    plain, _ = both(pair, **batch, max_new_tokens=8, eos_token_id=frequent_token, pad_token_id=PAD, **options)
    assert plain.tolist() == expected.sequences.tolist()


def test_beams_finish_on_the_stop_token(pair, batch, frequent_token):
    """The finished-hypothesis path runs: some returned beam ends on the stop id early."""
    got, _ = both(pair, **batch, max_new_tokens=8, num_beams=4, num_return_sequences=4,
                  eos_token_id=frequent_token, pad_token_id=PAD)  # fmt: skip
    new = got[:, batch["input_ids"].shape[1] :]
    assert (new == frequent_token).any()


# -- GenerationTesterMixin.test_beam_sample_generate ------------------------------------------
def test_beam_sample_generate(pair, batch, frequent_token):
    kwargs = dict(
        do_sample=True, num_beams=2, max_new_tokens=6, eos_token_id=frequent_token, pad_token_id=PAD
    )
    got, expected = both(pair, seed=3, **batch, **kwargs)
    assert got.tolist() == expected.tolist()


# -- test_logits_process.py: min-new-tokens, bad-words, no-repeat-ngram, repetition processors --
@pytest.mark.parametrize(
    "options",
    [
        {"min_new_tokens": 5},
        {"min_length": 20},
        {"bad_words_ids": [[5], [7, 8], [2]]},
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 1.4},
    ],
)
def test_logits_processors_match(pair, batch, frequent_token, options):
    kwargs = dict(max_new_tokens=8, eos_token_id=frequent_token, pad_token_id=PAD)
    got, expected = both(pair, **batch, **kwargs, **options)
    assert got.tolist() == expected.tolist()
    if "min_new_tokens" in options:
        assert not (got[:, batch["input_ids"].shape[1] :][:, :5] == frequent_token).any()


# -- GenerationIntegrationTests: custom stopping criteria and logits processors -------------------
def test_stopping_criteria_and_logits_processor_lists(pair, batch):
    class StopAtLength(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= stop_at, dtype=torch.bool)

    stop_at = batch["input_ids"].shape[1] + 3
    criteria = transformers.StoppingCriteriaList([StopAtLength()])
    processors = transformers.LogitsProcessorList([transformers.SuppressTokensLogitsProcessor([11, 12, 13])])
    kwargs = dict(max_new_tokens=10, stopping_criteria=criteria, logits_processor=processors)
    got, expected = both(pair, **batch, **kwargs)
    assert got.tolist() == expected.tolist() and got.shape[1] == stop_at
    plain_callable = [lambda ids, scores: scores.index_fill(1, torch.tensor([11, 12, 13]), float("-inf"))]
    ours, _, _ = pair
    assert ours.generate(**batch, **{**kwargs, "logits_processor": plain_callable}).tolist() == got.tolist()


# -- GenerationIntegrationTests.test_max_length_if_input_embeds / max_length handling -----------
def test_max_length(pair, batch):
    T = batch["input_ids"].shape[1]
    got, expected = both(pair, **batch, max_length=T + 4)
    assert got.tolist() == expected.tolist() and got.shape[1] == T + 4
    default, ref_default = both(pair, **batch)  # nobody set a length: 20 new tokens
    assert default.tolist() == ref_default.tolist() and default.shape[1] == T + 20
    ours, _, _ = pair
    with pytest.raises(InputError, match="max_length"):
        ours.generate(**batch, max_length=T)


# -- GenerationTesterMixin.test_generate_from_inputs_embeds; test_*_length_if_input_embeds --------
def test_generate_from_inputs_embeds(pair):
    # Through the function behind FastVLM.generate, which takes input_ids=None.
    model, ref, _ = pair
    ours = SimpleNamespace(generate=partial(generate, model))
    ids = torch.randint(3, 900, (2, 9), generator=torch.Generator().manual_seed(4))
    embeds = ref.get_input_embeddings()(ids)
    for kwargs in ({"max_new_tokens": 5}, {"max_length": 14}, {"min_length": 12, "max_new_tokens": 6}):
        expected = ref.generate(inputs_embeds=embeds, eos_token_id=None, **kwargs)
        got = ours.generate(inputs_embeds=embeds, eos_token_id=None, **kwargs)
        assert got.tolist() == expected.tolist()  # new tokens only, as transformers
        with_ids = ours.generate(input_ids=ids, inputs_embeds=embeds, eos_token_id=None, **kwargs)
        assert (
            with_ids.tolist()
            == ref.generate(input_ids=ids, inputs_embeds=embeds, eos_token_id=None, **kwargs).tolist()
        )
    with pytest.raises(InputError, match="inputs_embeds"):
        ours.generate(inputs_embeds=embeds, pixel_values=torch.zeros(1, 3, 128, 128))


# -- GenerationTesterMixin.test_left_padding_compatibility: a mask inferred from the pad id ------
def test_left_padded_batch_without_attention_mask(pair, batch):
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    got, expected = both(pair, **no_mask, max_new_tokens=6)
    assert got.tolist() == expected.tolist()
    assert got.tolist() == both(pair, **batch, max_new_tokens=6)[0].tolist()
    ours, _, _ = pair
    with pytest.warns(UserWarning, match="cannot be inferred"):
        ours.generate(**no_mask, max_new_tokens=2, pad_token_id=PAD, eos_token_id=[2, PAD])


# -- GenerationConfig objects and the checkpoint's generation_config.json ---------------------------
@pytest.mark.slow
def test_generation_config_object_and_checkpoint_defaults(pair, batch, tmp_path):
    ours, ref, folder = pair
    hf_config = transformers.GenerationConfig(max_new_tokens=5, num_beams=2, length_penalty=0.5)
    expected = ref.generate(**batch, generation_config=hf_config)
    assert ours.generate(**batch, generation_config=hf_config).tolist() == expected.tolist()
    assert ours.generate(**batch, generation_config=GenerationConfig(max_new_tokens=5, num_beams=2,
                         length_penalty=0.5)).tolist() == expected.tolist()  # fmt: skip

    saved = {"max_new_tokens": 4, "do_sample": True, "top_k": 3, "repetition_penalty": 1.2,
             "pad_token_id": PAD, "eos_token_id": 2, "transformers_version": "5.23.0"}  # fmt: skip
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps(saved))
    ours_ckpt = FastVLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    ref_ckpt = transformers.FastVlmForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.manual_seed(5)
    expected = ref_ckpt.generate(**batch)
    torch.manual_seed(5)
    got = ours_ckpt.generate(**batch)
    assert got.tolist() == expected.tolist() and got.shape[1] == batch["input_ids"].shape[1] + 4
    # Arguments beat the file.
    assert (
        ours_ckpt.generate(**batch, do_sample=False, max_new_tokens=2).shape[1]
        == batch["input_ids"].shape[1] + 2
    )


# -- unsupported options: one clear error naming them ----------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"output_attentions": True}, "output_attentions"),
        ({"num_beam_groups": 2, "num_beams": 2}, "num_beam_groups"),
        ({"streamer": object()}, "streamer"),
        ({"stop_strings": ["."]}, "stop_strings"),
        ({"colour": "blue"}, "colour"),
        ({"num_return_sequences": 2}, "num_return_sequences"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
        ({"bad_words_ids": [5]}, "bad_words_ids"),
        ({"generation_config": transformers.GenerationConfig(penalty_alpha=0.6, top_k=4)}, "penalty_alpha"),
    ],
)
def test_unsupported_options_raise_one_clear_error(pair, batch, kwargs, named):
    ours, _, _ = pair
    with pytest.raises(InputError, match=named):
        ours.generate(**batch, max_new_tokens=2, **kwargs)


@pytest.mark.slow
def test_cache_free_beam_search_equals_cached(pair, batch, frequent_token):
    ours, _, _ = pair
    kwargs = dict(max_new_tokens=6, num_beams=3, eos_token_id=frequent_token, pad_token_id=PAD)
    assert (
        ours.generate(**batch, **kwargs, use_cache=False).tolist()
        == ours.generate(**batch, **kwargs).tolist()
    )
