"""``fastvlm.load`` and the VLM object: ask, chat, batch, streaming and option errors."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from PIL import Image

import builders
import fastvlm
from fastvlm.errors import CheckpointError, InputError

IMAGE = str(builders.shared_assets() / "images" / "waterview.jpg")
OTHER = str(builders.shared_assets() / "images" / "000000039769.png")


@pytest.fixture(scope="module")
def vlm(tiny_checkpoint_dir):
    return fastvlm.load(tiny_checkpoint_dir, device="cpu", dtype="float32", progress=False)


def user(text: str, *images) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images), text]}]


@pytest.mark.slow
def test_ask_returns_text_and_streams_the_same(vlm):
    answer = vlm.ask(IMAGE, "What is shown in this image?", max_new_tokens=8)
    assert isinstance(answer, str) and answer
    pieces = list(vlm.ask(IMAGE, "What is shown in this image?", stream=True, max_new_tokens=8))
    assert "".join(pieces) == answer
    assert vlm.chat(user("What is shown in this image?", IMAGE), max_new_tokens=8).text == answer


def test_image_sources_are_interchangeable(vlm):
    """Path, PIL, bytes, data URI: same pixels, so same answer and one encoder call."""
    data = Path(IMAGE).read_bytes()
    sources = [IMAGE, Image.open(IMAGE), data, "data:image/jpeg;base64," + base64.b64encode(data).decode()]
    calls = vlm.engine.stats["encoder_calls"]
    answers = {vlm.ask(src, "Colours?", max_new_tokens=6) for src in sources}
    assert len(answers) == 1
    assert vlm.engine.stats["encoder_calls"] - calls <= 1


def test_text_only_and_several_images(vlm):
    assert isinstance(vlm.ask(None, "Say hello.", max_new_tokens=4), str)
    one = vlm.chat(user("Compare.", IMAGE), max_new_tokens=2)
    two = vlm.chat(user("Compare.", IMAGE, OTHER), max_new_tokens=2)
    n = vlm.processor.num_image_tokens
    assert two.usage.prompt_tokens == one.usage.prompt_tokens + n


def test_chat_result_fields_and_seed(vlm):
    kwargs = {"max_new_tokens": 10, "temperature": 0.7, "top_p": 0.9, "seed": 0, "stop": ["\n\n"]}
    r = vlm.chat(user("Describe it.", IMAGE), **kwargs)
    assert r.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.timings.total_s > 0
    assert vlm.chat(user("Describe it.", IMAGE), **kwargs).text == r.text
    events = list(vlm.chat(user("Describe it.", IMAGE), stream=True, **kwargs))
    assert events[-1].finished and events[-1].result.text == r.text


def test_batch_matches_single_calls(vlm):
    items = [
        user("First?", IMAGE),
        {"messages": user("Second?"), "max_new_tokens": 3},
        {"messages": user("Third?", OTHER), "temperature": 0.8, "seed": 1},
    ]
    results = vlm.batch(items, max_new_tokens=6)
    assert [r.usage.completion_tokens for r in results][1] <= 3
    singles = [
        vlm.chat(user("First?", IMAGE), max_new_tokens=6),
        vlm.chat(user("Second?"), max_new_tokens=3),
        vlm.chat(user("Third?", OTHER), max_new_tokens=6, temperature=0.8, seed=1),
    ]
    assert [r.token_ids for r in results] == [r.token_ids for r in singles]


def test_bad_options_are_one_line_input_errors(vlm):
    for call in [
        lambda: vlm.ask(IMAGE, "x", temprature=0.5),
        lambda: vlm.ask(IMAGE, "x", temperature="hot"),
        lambda: vlm.ask(IMAGE, "x", top_p=0),
        lambda: vlm.ask(IMAGE),
        lambda: vlm.ask("/no/such.png", "x"),
        lambda: vlm.batch([{"max_new_tokens": 3}]),
    ]:
        with pytest.raises(InputError) as info:
            call()
        assert "\n" not in str(info.value)
    assert not vlm.engine.has_work


def test_load_reports_a_bad_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        fastvlm.load(tmp_path, device="cpu")


def test_generate_and_stream_take_a_request(vlm):
    from fastvlm.api import build_request, image_message

    request = build_request(image_message(IMAGE, "What is shown?"), max_new_tokens=5)
    result = vlm.generate(request)
    assert result.usage.completion_tokens <= 5
    again = build_request(image_message(IMAGE, "What is shown?"), max_new_tokens=5)
    assert "".join(vlm.stream(again)) == result.text
    assert "FusedAttention" in repr(vlm.model)  # load gives the fast modules by default


def test_load_can_refuse_local_image_files(tiny_checkpoint_dir):
    strict = fastvlm.load(
        tiny_checkpoint_dir,
        device="cpu",
        dtype="float32",
        progress=False,
        allow_local_images=False,
        allow_remote_images=False,
    )
    with pytest.raises(InputError):
        strict.ask(IMAGE, "What is shown?", max_new_tokens=2)
    assert strict.ask(Image.open(IMAGE), "What is shown?", max_new_tokens=2) is not None
