"""``save_pretrained`` on the model and the processor writes a transformers ``fast_vlm``
checkpoint: transformers loads it with the same logits, ids and pixels, and so do we."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from builders import IMAGE_SIZE, build_reference, save_reference, tiny_checkpoint
from fastvlm import FastVLM, FastVLMProcessor
from fastvlm.errors import CheckpointError, FastVLMError, InputError
from fastvlm.models.optimize import SpeedOptions

IMAGE_ID = 151646


def _inputs(image_id: int = IMAGE_ID, vocab: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 14), generator=g)
    ids[:, 3:7] = image_id  # 4 image tokens per 128x128 image
    return ids, torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _hf_logits(folder, ids, pixels) -> torch.Tensor:
    from transformers import FastVlmForConditionalGeneration

    model = FastVlmForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def _our_logits(model, ids, pixels) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pixels).logits


@pytest.fixture(scope="module")
def apple_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("apple"), fmt="llava_qwen2")


def test_a_speed_optimised_model_saves_what_transformers_loads(tiny_checkpoint_dir, tmp_path):
    # Default speed options: fused q|k|v and gate|up, transposed float32 linears, channels-last tower.
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32, progress=False)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "fast_vlm" and config["dtype"] == "float32"
    ids, pixels = _inputs()
    reference = _hf_logits(tiny_checkpoint_dir, ids, pixels)
    torch.testing.assert_close(_hf_logits(tmp_path, ids, pixels), reference, atol=1e-5, rtol=0)
    again = FastVLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    torch.testing.assert_close(
        _our_logits(again, ids, pixels), _our_logits(model, ids, pixels), atol=0, rtol=0
    )


def test_the_written_keys_are_the_reference_checkpoints(tiny_checkpoint_dir, tmp_path):
    from safetensors import safe_open

    FastVLM.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32, progress=False).save_pretrained(
        tmp_path
    )
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as ours:
        with safe_open(str(tiny_checkpoint_dir / "model.safetensors"), "pt") as theirs:
            assert sorted(ours.keys()) == sorted(theirs.keys())


def test_generation_defaults_travel_with_the_checkpoint(tiny_checkpoint_dir, tmp_path):
    from transformers import GenerationConfig

    FastVLM.from_pretrained(tiny_checkpoint_dir, progress=False).save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.eos_token_id == [151645, 151643] and loaded.pad_token_id == 151643


def test_large_models_are_sharded_with_an_index(tiny_checkpoint_dir, tmp_path):
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, dtype=torch.float32, progress=False)
    model.save_pretrained(tmp_path, max_shard_size="10MB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ids, pixels = _inputs()
    torch.testing.assert_close(
        _hf_logits(tmp_path, ids, pixels), _our_logits(model, ids, pixels), atol=1e-5, rtol=0
    )
    model.save_pretrained(tmp_path)  # one file now: the old shards and index must not linger
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    reloaded = FastVLM.from_pretrained(tmp_path, dtype=torch.float32, progress=False)
    torch.testing.assert_close(_our_logits(reloaded, ids, pixels), _our_logits(model, ids, pixels))


def test_an_apple_checkpoint_is_written_in_the_transformers_layout(apple_dir, tmp_path):
    folder, reference = apple_dir
    model = FastVLM.from_pretrained(folder, dtype=torch.float32, progress=False, speed=SpeedOptions.off())
    model.save_pretrained(tmp_path)
    ids, pixels = _inputs()
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(_hf_logits(tmp_path, ids, pixels), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_training_form_weights_are_written_fused(tmp_path):
    source, reference = tiny_checkpoint(tmp_path / "src", fused=False)
    model = FastVLM.from_pretrained(source, dtype=torch.float32, progress=False)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["model_args"]["inference_mode"] is True
    ids, pixels = _inputs()
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(_hf_logits(tmp_path / "out", ids, pixels), expected, atol=1e-5, rtol=0)


def test_tied_embeddings_are_written_once(tmp_path):
    from safetensors import safe_open

    reference = build_reference(tied=True)
    save_reference(reference, tmp_path / "src")
    model = FastVLM.from_pretrained(tmp_path / "src", dtype=torch.float32, progress=False)
    model.save_pretrained(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    ids, pixels = _inputs(image_id=1000, vocab=900)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(_hf_logits(tmp_path / "out", ids, pixels), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_a_quantized_model_is_refused_before_anything_is_written(tiny_checkpoint_dir, tmp_path, bits):
    speed = SpeedOptions(int8=bits == "int8", int4=bits == "int4")
    try:
        model = FastVLM.from_pretrained(
            tiny_checkpoint_dir, dtype=torch.bfloat16, progress=False, speed=speed
        )
    except FastVLMError as exc:  # int4 kernels missing in this torch build
        pytest.skip(str(exc))
    with pytest.raises(FastVLMError, match="int8/int4 weights") as info:
        model.save_pretrained(tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_saving_into_a_file_is_refused(tiny_checkpoint_dir, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, progress=False)
    with pytest.raises(CheckpointError, match="is a file"):
        model.save_pretrained(target)


# ---- the processor ------------------------------------------------------------------


def _photo() -> Image.Image:
    return Image.effect_mandelbrot((300, 180), (-2, -1, 1, 1), 60).convert("RGB")


@pytest.mark.slow
def test_the_saved_processor_gives_transformers_the_same_ids_and_pixels(tiny_checkpoint_dir, tmp_path):
    from transformers import AutoProcessor

    processor = FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)
    files = processor.save_pretrained(tmp_path)
    assert {p.rsplit("/", 1)[-1] for p in files} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    }
    saved, original = (
        AutoProcessor.from_pretrained(tmp_path),
        AutoProcessor.from_pretrained(tiny_checkpoint_dir),
    )
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Was ist das? 你好"}]}
    ]
    prompt = saved.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == original.apply_chat_template(conversation, add_generation_prompt=True)
    texts = [prompt, "<|im_start|>user\nhi<|im_end|>"]
    theirs = saved(images=[_photo()], text=texts, padding=True, return_tensors="pt")
    expected = original(images=[_photo()], text=texts, padding=True, return_tensors="pt")
    assert torch.equal(theirs["input_ids"], expected["input_ids"])
    assert torch.equal(theirs["pixel_values"], expected["pixel_values"])


@pytest.mark.slow
def test_our_processor_reloads_what_it_saved(tiny_checkpoint_dir, tmp_path):
    processor = FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)
    FastVLM.from_pretrained(tiny_checkpoint_dir, progress=False).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = FastVLMProcessor.from_pretrained(tmp_path)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": _photo()}, {"type": "text", "text": "Hi"}]}
    ]
    a = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    b = again.apply_chat_template(conversation, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert again.settings == processor.settings


def test_an_apple_processor_is_refused_in_one_line(apple_dir, tmp_path):
    processor = FastVLMProcessor.from_pretrained(apple_dir[0])
    with pytest.raises(CheckpointError, match="padded to a square") as info:
        processor.save_pretrained(tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"safe_serialization": False}, "safe_serialization"),
        ({"push_to_hub": True}, "push_to_hub"),
        ({"x": 1}, "'x'"),
    ],
)
@pytest.mark.slow
def test_options_we_cannot_honour_are_refused_in_one_line(tiny_checkpoint_dir, tmp_path, kwargs, named):
    model = FastVLM.from_pretrained(tiny_checkpoint_dir, progress=False)
    processor = FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)
    for save in (model.save_pretrained, processor.save_pretrained):
        with pytest.raises(InputError, match=named) as info:
            save(tmp_path / "out", **kwargs)
        assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / "ok", safe_serialization=True, push_to_hub=False)
    assert (tmp_path / "ok" / "model.safetensors").is_file()
