"""Our FastVLM against transformers' FastVlmForConditionalGeneration on the same tiny weights.

Both forms of ours are held to the reference: the fast default of ``from_pretrained``
and the plain modules of ``SpeedOptions.off()``.
Tolerance: max |ours - ref| / max |ref| <= 1e-4 in float32; greedy tokens identical.
"""

from __future__ import annotations

import json

import pytest
import torch

import builders
from fastvlm import FastVLM, SpeedOptions
from fastvlm.errors import CheckpointError
from fastvlm.models.qwen2 import FusedAttention

torch.set_grad_enabled(False)
TOL = 1e-4
N_IMG = (builders.IMAGE_SIZE // 64) ** 2


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def make_prompt(g: torch.Generator, length: int, images: int, vocab: int, image_id: int) -> torch.Tensor:
    """Random text ids with ``images`` runs of placeholders after a short prefix."""
    ids = torch.randint(3, min(vocab, 900), (length,), generator=g).tolist()
    for i in range(images):
        at = 2 + i * (N_IMG + 3)
        ids[at:at] = [image_id] * N_IMG
    return torch.tensor(ids)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = r
        mask[b, T - len(r) :] = 1
    return ids, mask


@pytest.fixture(scope="module", params=["fused", "unfused"])
def checkpoint(request, tmp_path_factory):
    """(folder, reference) for a tower saved in fused or training form."""
    ref = builders.build_reference(fused=request.param == "fused", seed=1)
    return builders.save_reference(ref, tmp_path_factory.mktemp(request.param)), ref


@pytest.fixture(scope="module", params=["fast", "plain"])
def pair(request, checkpoint):
    folder, ref = checkpoint
    speed = SpeedOptions() if request.param == "fast" else SpeedOptions.off()
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, device="cpu", progress=False, speed=speed)
    fused = isinstance(ours.language_model.layers[0].self_attn, FusedAttention)
    assert fused == (request.param == "fast") == ours.vision_tower.channels_last
    return ours, ref


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    image_id = builders.SMALL_IMAGE_TOKEN_ID
    px = torch.rand(2, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE, generator=g)
    single = make_prompt(g, 12, 1, builders.SMALL_VOCAB, image_id)
    other = make_prompt(g, 5, 1, builders.SMALL_VOCAB, image_id)
    text = torch.randint(3, 900, (9,), generator=g)
    return {"px": px, "single": single, "other": other, "text": text}


def test_image_features(pair, inputs):
    ours, ref = pair
    expected = ref.model.get_image_features(inputs["px"]).pooler_output
    got = ours.encode_images(inputs["px"])
    assert got.shape == expected.shape == (2, N_IMG, builders.TINY_TEXT["hidden_size"])
    assert rel_diff(got, expected) <= TOL


def test_logits_single_image_and_loss(pair, inputs):
    ours, ref = pair
    ids = inputs["single"][None]
    labels = ids.masked_fill(ids == builders.SMALL_IMAGE_TOKEN_ID, -100)
    expected = ref(input_ids=ids, pixel_values=inputs["px"][:1], labels=labels)
    got = ours(input_ids=ids, pixel_values=inputs["px"][:1], labels=labels)
    assert rel_diff(got.logits, expected.logits) <= TOL
    assert abs(float(got.loss) - float(expected.loss)) / abs(float(expected.loss)) <= TOL


def test_logits_left_padded_batch(pair, inputs):
    ours, ref = pair
    ids, mask = left_pad([inputs["single"], inputs["other"]])
    expected = ref(input_ids=ids, pixel_values=inputs["px"], attention_mask=mask).logits
    got = ours(input_ids=ids, pixel_values=inputs["px"], attention_mask=mask).logits
    real = mask.bool()  # logits at padding positions are meaningless on both sides
    assert rel_diff(got[real], expected[real]) <= TOL


def test_logits_text_only(pair, inputs):
    ours, ref = pair
    ids = inputs["text"][None]
    assert rel_diff(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= TOL


@pytest.mark.parametrize("case", ["single", "batch", "text"])
def test_greedy_generation_matches(pair, inputs, case):
    ours, ref = pair
    if case == "single":
        kwargs = {"input_ids": inputs["single"][None], "pixel_values": inputs["px"][:1]}
    elif case == "batch":
        ids, mask = left_pad([inputs["single"], inputs["other"]])
        kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["px"]}
    else:
        kwargs = {"input_ids": inputs["text"][None]}
    expected = ref.generate(**kwargs, max_new_tokens=12, do_sample=False)
    got = ours.generate(**kwargs, max_new_tokens=12, do_sample=False)
    assert got.tolist() == expected.tolist()


def test_batched_rows_equal_single_rows(pair, inputs):
    ours, _ = pair
    ids, mask = left_pad([inputs["single"], inputs["other"]])
    batch = ours.generate(input_ids=ids, attention_mask=mask, pixel_values=inputs["px"], max_new_tokens=8)
    for b, row in enumerate([inputs["single"], inputs["other"]]):
        alone = ours.generate(input_ids=row[None], pixel_values=inputs["px"][b : b + 1], max_new_tokens=8)
        assert batch[b, -8:].tolist() == alone[0, -8:].tolist()


def test_cache_free_generation_equals_cached(pair, inputs):
    ours, _ = pair
    ids, mask = left_pad([inputs["single"], inputs["other"]])
    kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["px"], "max_new_tokens": 6}
    assert ours.generate(**kwargs).tolist() == ours.generate(**kwargs, use_cache=False).tolist()


def test_generated_placeholder_id_is_embedded_as_text(pair, inputs, monkeypatch):
    ours, _ = pair
    image_id, forced_step = builders.SMALL_IMAGE_TOKEN_ID, 1
    real_logits, calls = ours.logits, []

    def placeholder_at_forced_step(hidden: torch.Tensor) -> torch.Tensor:
        # One logits call per generated token in both paths, so the call count is the step.
        logits = real_logits(hidden)
        if len(calls) == forced_step:
            logits[..., image_id] = logits.max() + 1
        calls.append(None)
        return logits

    monkeypatch.setattr(ours, "logits", placeholder_at_forced_step)
    ids = inputs["single"][None]
    kwargs = {"input_ids": ids, "pixel_values": inputs["px"][:1], "max_new_tokens": 6}
    cached = ours.generate(**kwargs)
    calls.clear()
    uncached = ours.generate(**kwargs, use_cache=False)
    assert cached[0, ids.shape[1] + forced_step] == image_id
    assert uncached.tolist() == cached.tolist()


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_heads(tmp_path, tied):
    ref = builders.build_reference(tied=tied, seed=2)
    folder = builders.save_reference(ref, tmp_path)
    plain = FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False, speed=SpeedOptions.off())
    assert (plain.lm_head.weight is plain.language_model.embed_tokens.weight) == tied
    # The fast float32 layout stores the head transposed; a tied embedding reads it through a view.
    fast = FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    assert (fast.lm_head.weight_t.data_ptr() == fast.language_model.embed_tokens.weight.data_ptr()) == tied
    ids = torch.randint(3, 900, (1, 10))
    for ours in (plain, fast):
        assert rel_diff(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= TOL


def test_sharded_checkpoint(tmp_path):
    ref = builders.build_reference(seed=3)
    folder = builders.save_reference(ref, tmp_path, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    ids = torch.randint(3, 900, (1, 10))
    assert rel_diff(ours(input_ids=ids).logits, ref(input_ids=ids).logits) <= TOL


@pytest.mark.parametrize("fused", [True, False])
def test_apple_format(tmp_path, fused):
    ref = builders.build_reference(fused=fused, seed=4)
    folder = builders.save_apple(ref, tmp_path / "apple")
    ours = FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False)
    assert ours.config.format == "llava_qwen2"
    g = torch.Generator().manual_seed(5)
    px = torch.rand(1, 3, builders.IMAGE_SIZE, builders.IMAGE_SIZE, generator=g)
    # Apple checkpoints use our placeholder id; give the reference its own id at the same spots.
    ids = make_prompt(g, 10, 1, builders.SMALL_VOCAB, ours.config.image_token_id)[None]
    ref_ids = ids.masked_fill(ids == ours.config.image_token_id, ref.config.image_token_id)
    assert rel_diff(ours.encode_images(px), ref.model.get_image_features(px).pooler_output) <= TOL
    assert (
        rel_diff(ours(input_ids=ids, pixel_values=px).logits, ref(input_ids=ref_ids, pixel_values=px).logits)
        <= TOL
    )


def test_missing_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = builders.save_reference(builders.build_reference(seed=6), tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="language_model.layers.1.mlp.up_proj.weight"):
        FastVLM.from_pretrained(folder, progress=False)


def test_unexpected_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = builders.save_reference(builders.build_reference(seed=6), tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["model.language_model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected weight.*extra_proj"):
        FastVLM.from_pretrained(folder, progress=False)


def test_wrong_shape_and_wrong_model_type(tmp_path):
    folder = builders.save_reference(builders.build_reference(seed=7), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        FastVLM.from_pretrained(folder, progress=False)
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a FastVLM checkpoint"):
        FastVLM.from_pretrained(folder, progress=False)


def test_placeholder_count_mismatch(pair, inputs):
    ours, _ = pair
    ids = inputs["single"][None][:, 1:]
    ids = torch.cat([ids, torch.full((1, 1), builders.SMALL_IMAGE_TOKEN_ID)], dim=1)  # N + 1 placeholders
    with pytest.raises(ValueError, match=f"{N_IMG + 1} image placeholder tokens.*{N_IMG} image features"):
        ours(input_ids=ids, pixel_values=inputs["px"][:1])


def test_offline_hub_id_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="local"):
        FastVLM.from_pretrained("apple/FastVLM-0.5B", progress=False)
