"""Several images in one request, in one message or across turns, over HTTP: carried in
order, counted against the context, and refused with a 400 that says so when they do
not fit (before any is decoded)."""

from __future__ import annotations

import openai
import pytest
import torch

import builders
from fastvlm.generation.engine import Engine
from fastvlm.processing import processor as processor_module
from test_server import MODEL, data_uri, engine_answer, load_tiny, serve

NAMES = ("000000039769.png", "waterview.jpg", "ocr_example3.jpg")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_tiny(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [(builders.shared_assets() / "images" / name).read_bytes() for name in NAMES]


def image_part(data: bytes) -> dict:
    media = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
    return {"type": "image_url", "image_url": {"url": data_uri(data, media)}}


def conversation(photos: list[bytes]) -> list[dict]:
    """Two images in the first turn, a third in the second."""
    return [
        {"role": "user", "content": [*map(image_part, photos[:2]), {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, image_part(photos[2])]},
    ]  # fmt: skip


def as_engine_messages(messages: list[dict], photos: list[bytes]) -> list[dict]:
    """The same conversation as the library takes it (file bytes instead of data URIs)."""
    by_url = {image_part(p)["image_url"]["url"]: p for p in photos}
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", "image": by_url[p["image_url"]["url"]]} if p["type"] == "image_url" else p
                for p in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


class RecordingEngine(Engine):
    """Keeps what ``prepare`` made of each request, to look at the images' order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prepared = []

    def prepare(self, request):
        prepared = super().prepare(request)
        self.prepared.append(prepared)
        return prepared


@pytest.mark.slow
def test_images_across_turns_arrive_in_order(tiny, photos):
    model, processor = tiny
    engine = RecordingEngine(model, processor, max_batch=2)
    messages = conversation(photos)
    with serve(model, processor, engine=engine) as live:
        reply = live.client().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0
        )
    expected = engine_answer(tiny, as_engine_messages(messages, photos), max_new_tokens=6, sampling=_greedy())
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    (prepared,) = engine.prepared
    assert prepared.pixels.shape[0] == 3
    for pixels, data in zip(prepared.pixels, photos, strict=True):  # in the order they were sent
        alone = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": data}]}],
            tokenize=True, return_dict=True, uint8_pixels=True,
        )["pixel_values"][0]  # fmt: skip
        assert torch.equal(pixels, alone)
    image_ids = (prepared.prompt_ids == processor.image_token_id).sum().item()
    assert image_ids == 3 * processor.num_image_tokens


def _greedy():
    from fastvlm.generation.sampling import SamplingParams

    return SamplingParams(temperature=0.0)


def test_images_that_do_not_fit_the_context_are_a_400(tiny, photos, monkeypatch):
    model, processor = tiny
    engine = Engine(model, processor, max_batch=2, max_seq_len=48)
    with serve(model, processor, engine=engine) as live:
        client = live.client()
        # Refused by the server from the image count alone, before fetching or decoding any.
        many = [{"role": "user", "content": [image_part(photos[0])] * 8 + [{"type": "text", "text": "Hi"}]}]
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=many, max_tokens=20)
        assert info.value.code == "context_length_exceeded"
        message = info.value.body["message"]
        assert "8 images take 32 tokens (4 each) plus 20 new tokens" in message and "48-token" in message

        # Images and text together: the engine's exact count, still before any image is decoded.
        def refuse(*args, **kwargs):
            raise AssertionError("an image was decoded for a request that cannot fit")

        monkeypatch.setattr(processor_module.FastVLMProcessor, "_pixels", refuse)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(
                    model=MODEL, messages=conversation(photos), max_tokens=8, stream=stream
                )
            assert info.value.code == "context_length_exceeded"
            assert "(3 images take 12 of them) plus 8 new tokens" in info.value.body["message"]
        monkeypatch.undo()
        # The server keeps serving, images included.
        one = [{"role": "user", "content": [image_part(photos[1]), {"type": "text", "text": "Hi"}]}]
        assert client.chat.completions.create(model=MODEL, messages=one, max_tokens=3).choices


def test_the_image_count_limit_is_the_engines(tiny, photos):
    model, processor = tiny
    engine = Engine(model, processor, max_batch=1, max_images_per_request=2)
    three = conversation(photos)
    with serve(model, processor, engine=engine) as live:
        with pytest.raises(openai.BadRequestError) as info:
            live.client().chat.completions.create(model=MODEL, messages=three, max_tokens=3)
    assert info.value.code == "too_many_images" and "at most 2" in info.value.body["message"]
