"""FastVLMProcessor against transformers' LlavaProcessor / CLIPImageProcessor / Qwen2 tokenizer.

The reference is built from the shared Qwen2 tokenizer files exactly as the Hugging
Face FastVLM checkpoints are, saved with ``save_pretrained``, and both processors load
that same folder. Tolerances: ``input_ids`` identical; ``pixel_values`` within one
intensity level (1/255); in practice they are bit-identical on CPU.
"""

from __future__ import annotations

import base64
import io
import os
import unicodedata
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

import builders
from fastvlm.errors import CheckpointError, ContextLengthError, InputError
from fastvlm.processing import IMAGE_PLACEHOLDER_ID, FastVLMProcessor, Qwen2Tokenizer
from processor_fixtures import (
    CLIP_KWARGS,
    apple_reference_pixels,
    build_apple_checkpoint,
    build_hf_checkpoint,
    build_legacy_hf_checkpoint,
    encode_image,
    jpeg_with_orientation,
    png_header_only,
)

ASSETS = builders.shared_assets()  # conftest stops the run when they are missing
# The reference decodes files with torchvision.io, which warns that it is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision")
IMAGE_NAMES = [
    "000000039769.png",
    "llava_v1_5_radar.jpg",
    "ocr_example3.jpg",
    "sample_image_cord_test_receipt_00004.png",
    "waterview.jpg",
]
ONE_LEVEL = 1 / 255 + 1e-6


def image_path(name: str) -> str:
    return str(ASSETS / "images" / name)


def user_turn(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(value: str) -> dict:
    return {"type": "text", "text": value}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fastvlm-hf")
    build_hf_checkpoint(folder, ASSETS)
    return folder


@pytest.fixture(scope="module")
def ours(hf_dir) -> FastVLMProcessor:
    return FastVLMProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def ref(hf_dir):
    processor = transformers.AutoProcessor.from_pretrained(hf_dir)
    processor.tokenizer.padding_side = "left"
    return processor


def ref_inputs(ref, conversation):
    return ref.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )


def assert_same_inputs(got, want):
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert ("pixel_values" in got) == ("pixel_values" in want)
    if "pixel_values" in want:
        assert got["pixel_values"].dtype == torch.float32
        assert got["pixel_values"].shape == want["pixel_values"].shape
        assert (got["pixel_values"] - want["pixel_values"]).abs().max().item() <= ONE_LEVEL


# -- Hugging Face layout against the reference ----------------------------------------


def test_loaded_settings(ours):
    assert (ours.format, ours.image_token_id, ours.num_image_tokens, ours.max_length) == (
        "fast_vlm",
        151646,
        256,
        32768,
    )
    assert ours.tokenizer.padding_side == "left"


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_real_images_match_reference(ours, ref, name):
    for source in (image_path(name), Image.open(image_path(name))):
        conversation = user_turn({"type": "image", "image": source}, text("Describe the image."))
        got, want = (
            ours.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=True
            ),
            ref_inputs(ref, conversation),
        )
        assert_same_inputs(got, want)
        assert got["pixel_values"].shape == (1, 3, 1024, 1024)
        assert (got["input_ids"] == IMAGE_PLACEHOLDER_ID).sum() == 256


def test_batch_is_left_padded_like_reference(ours, ref):
    conversations = [
        user_turn(text("Hi there, how are you?")),
        [
            {"role": "system", "content": [text("Be brief.")]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": image_path(IMAGE_NAMES[1])},
                    {"type": "image", "url": image_path(IMAGE_NAMES[4])},
                    text("Compare these."),
                ],
            },
            {"role": "assistant", "content": [text("They differ.")]},
            {"role": "user", "content": [text("How?")]},
        ],
        user_turn(text("What is it?"), {"type": "image", "path": image_path(IMAGE_NAMES[0])}),
    ]
    got = ours.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert_same_inputs(got, ref_inputs(ref, conversations))
    assert got["attention_mask"][0, 0] == 0 and got["input_ids"][0, 0] == ours.tokenizer.pad_token_id
    assert ours.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=True
    ) == ref.apply_chat_template(conversations, add_generation_prompt=True)


def test_prompt_strings_match_reference(ours, ref):
    conversation = user_turn(text("What?"), {"type": "image"})
    for add in (True, False):
        got = ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add)
        assert got == ref.apply_chat_template(conversation, add_generation_prompt=add)
    assert got.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_call_with_images_and_text_matches_llava(ours, ref):
    prompts = ["<image>\nFirst?", "Two: <image> and <image>"]
    images = [Image.open(image_path(n)) for n in IMAGE_NAMES[:3]]
    got = ours(images=images, text=prompts)
    assert_same_inputs(got, ref(images=images, text=prompts, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("template_in", ["tokenizer_config", "chat_template.json", "added_tokens.json"])
def test_old_file_sets_match_reference(ours, tmp_path, template_in):
    folder = tmp_path / "legacy"
    build_legacy_hf_checkpoint(folder, ASSETS, template_in)
    legacy = FastVLMProcessor.from_pretrained(folder)
    reference = transformers.AutoProcessor.from_pretrained(folder)
    reference.tokenizer.padding_side = "left"
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    conversation = user_turn({"type": "image", "image": image}, text("Is it <|im_end|> green?\n  ok"))
    # transformers' processor ignores a template that only the tokenizer config holds.
    renderer = reference if reference.chat_template else reference.tokenizer
    prompt = renderer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    got = legacy.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert_same_inputs(got, reference(images=[image], text=prompt, return_tensors="pt"))
    assert_same_inputs(
        got,
        ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True),
    )
    assert legacy.tokenizer.decode(got["input_ids"][0]) == reference.tokenizer.decode(got["input_ids"][0])


def test_image_conversions_match_reference(ours, ref, tmp_path):
    base = Image.new("RGB", (64, 32), (250, 20, 20))
    base.paste((20, 20, 250), (0, 0, 16, 32))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((64, 32)))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    files = {
        "rotated.jpg": jpeg_with_orientation(base, 6),
        "grey.png": encode_image(base.convert("L"), "PNG"),
        "rgba.png": encode_image(rgba, "PNG"),
        "palette.png": encode_image(palette, "PNG", transparency=0),
        "la.png": encode_image(rgba.convert("LA"), "PNG"),
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        for source in (str(path), Image.open(path)):
            conversation = user_turn({"type": "image", "image": source}, text("x"))
            assert_same_inputs(
                ours.apply_chat_template(
                    conversation, add_generation_prompt=True, tokenize=True, return_dict=True
                ),
                ref_inputs(ref, conversation),
            )


def test_every_source_kind_gives_same_pixels(ours, tmp_path):
    data = encode_image(Image.open(image_path(IMAGE_NAMES[0])).resize((80, 60)), "PNG")
    path = tmp_path / "small.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    parts = [
        {"type": "image", "path": str(path)},
        {"type": "image", "image": path},
        {"type": "image", "url": path.as_uri()},
        {"type": "image", "image": data},
        {"type": "image", "base64": b64},
        {"type": "image", "image": b64},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        {"type": "image", "image": Image.open(io.BytesIO(data))},
    ]
    pixels = ours.apply_chat_template(
        user_turn(*parts, text("Same?")), add_generation_prompt=True, tokenize=True, return_dict=True
    )["pixel_values"]
    assert pixels.shape == (len(parts), 3, 1024, 1024)
    assert all(torch.equal(pixels[0], p) for p in pixels[1:])


def test_text_only_and_string_content(ours):
    as_string = [{"role": "user", "content": "Hello!"}]
    as_parts = user_turn(text("Hello!"))
    got = ours.apply_chat_template(as_string, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert "pixel_values" not in got
    assert torch.equal(
        got["input_ids"],
        ours.apply_chat_template(as_parts, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ],
    )
    assert torch.equal(
        got.input_ids,
        ours.apply_chat_template(as_string, return_dict=False, add_generation_prompt=True, tokenize=True),
    )


def test_outputs_move_and_cast(ours):
    image = Image.new("RGB", (8, 8))
    inputs = ours.apply_chat_template(
        user_turn({"type": "image", "image": image}),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    ).to("cpu", torch.bfloat16)
    assert inputs.pixel_values.dtype == torch.bfloat16
    assert inputs.input_ids.dtype == torch.long and inputs.attention_mask.dtype == torch.long


def test_padding_side_can_be_changed(hf_dir):
    processor = FastVLMProcessor.from_pretrained(hf_dir)
    processor.tokenizer.padding_side = "right"
    batch = processor.apply_chat_template(
        [user_turn(text("a")), user_turn(text("a much longer question"))],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][0, 0] == 1
    encoded = processor.tokenizer(["a", "a much longer question"])
    pad = processor.tokenizer.pad_token_id
    assert encoded["input_ids"][0].tolist() == processor.tokenizer.encode("a") + [pad] * 3
    with pytest.raises(InputError):
        processor.tokenizer.padding_side = "middle"


def test_decode_matches_reference(ours, ref):
    ids = ours.apply_chat_template(
        user_turn(text("Größe 🎉 ok")), return_dict=False, add_generation_prompt=True, tokenize=True
    )[0].tolist()
    ids += [ours.tokenizer.eos_token_id, IMAGE_PLACEHOLDER_ID]
    for skip in (False, True):
        want = ref.tokenizer.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=skip) == want
    assert ours.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ref.batch_decode(
        [ids, ids], skip_special_tokens=True
    )


# -- the tokenizer on its own ---------------------------------------------------------

TRICKY = [
    "Hello world",
    "  leading and trailing  ",
    "tabs\t\tand\nnew\r\nlines\n\n\n",
    "     \n    x",
    "I'm sure you'RE right, we'll see; they'd've",
    "1234567890 3.14159 -42 1e-9",
    "é vs e\u0301 (NFC) and ﬁ ligature",
    "日本語のテキスト、中文，한국어",
    "emoji 🎉👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
    "العربية हिन्दी ไทย Ελληνικά",
    "zero\u200bwidth and control \x00\x07 chars",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "not<|im_end|>special<image>tags",
    "def f(x):\n    return {'a': [1, 2]}  # code",
    "https://example.com/a?b=c&d=e#frag",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]


@pytest.fixture(scope="module")
def slow_pair():
    folder = ASSETS / "tokenizer-qwen2"
    return Qwen2Tokenizer.from_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)


def test_tokenizer_matches_transformers(slow_pair, ours, ref):
    tokenizer, reference = slow_pair
    assert tokenizer.encode("Hello world") == [9707, 1879]
    for sample in TRICKY:
        assert tokenizer.encode(sample) == reference.encode(sample), sample
        assert ours.tokenizer.encode(sample) == ref.tokenizer.encode(sample), sample
    for name in ("eos_token_id", "pad_token_id", "vocab_size", "all_special_ids"):
        assert getattr(tokenizer, name) == getattr(reference, name), name
    assert len(tokenizer) == len(reference) and len(ours.tokenizer) == len(ref.tokenizer)
    assert ours.tokenizer.convert_tokens_to_ids("<image>") == 151646


def test_tokenizer_round_trips(slow_pair):
    tokenizer, _ = slow_pair
    for sample in TRICKY:
        ids = tokenizer.encode(sample)
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", sample)
        special_free = tokenizer.decode(ids, skip_special_tokens=True)
        assert "<|im_start|>" not in special_free and "<|endoftext|>" not in special_free


def test_stream_decoder_emits_whole_characters(slow_pair):
    tokenizer, _ = slow_pair
    sample = "emoji 🎉👍🏽 👨‍👩‍👧 中文 done"
    ids = tokenizer.encode(sample)
    stream = tokenizer.decode_stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == sample
    assert not any("\ufffd" in piece for piece in pieces)


# -- Apple layout ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def apple(tmp_path_factory) -> FastVLMProcessor:
    folder = tmp_path_factory.mktemp("fastvlm-apple") / "ckpt"
    build_apple_checkpoint(folder, ASSETS)
    return FastVLMProcessor.from_pretrained(folder)


# Apple's conv_qwen_2 (llava/conversation.py in apple/ml-fastvlm), written out here rather
# than taken from our template: SeparatorStyle.QWEN_2 renders system + sep, then
# role + message + sep for each turn, then the bare assistant role for the reply.
# predict.py puts "<image>\n" in front of the question of the turn that has the image.
QWEN_2_SYSTEM = "<|im_start|>system\n"
QWEN_2_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
QWEN_2_SEP = "<|im_end|>\n"


def conv_qwen_2(turns: list[str], system: str = "You are a helpful assistant.") -> str:
    prompt = QWEN_2_SYSTEM + system + QWEN_2_SEP
    for i, message in enumerate(turns):
        prompt += QWEN_2_ROLES[i % 2] + message + QWEN_2_SEP
    return prompt + QWEN_2_ROLES[1]


def test_apple_prompt_is_conv_qwen_2(apple, ours, slow_pair):
    conversation = user_turn({"type": "image", "image": Image.new("RGB", (4, 4))}, text("What is this?"))
    prompt = apple.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    expected = conv_qwen_2(["<image>\nWhat is this?"])
    assert (
        prompt
        == expected
        == ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    )
    # tokenizer_image_token: encode the pieces around <image>, join them with the image ids.
    _, reference = slow_pair
    before, after = expected.split("<image>")
    want = reference.encode(before) + [IMAGE_PLACEHOLDER_ID] * 256 + reference.encode(after)
    assert (
        apple.apply_chat_template(conversation, return_dict=False, add_generation_prompt=True, tokenize=True)[
            0
        ].tolist()
        == want
    )
    assert (apple.format, apple.num_image_tokens, apple.max_length) == ("llava_qwen2", 256, 8192)


def test_apple_multi_turn_prompt(apple):
    conversation = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "image"}, text("What?")]},
        {"role": "assistant", "content": "Un chat."},
        {"role": "user", "content": "Sure?"},
    ]
    expected = conv_qwen_2(["<image>\nWhat?", "Un chat.", "Sure?"], system="Answer in French.")
    assert apple.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == expected


@pytest.mark.parametrize("name", [IMAGE_NAMES[0], IMAGE_NAMES[2]])
def test_apple_pixels_pad_to_square(apple, name):
    image = Image.open(image_path(name))
    want, square = apple_reference_pixels(image)
    got = apple.apply_chat_template(
        user_turn({"type": "image", "image": image}, text("x")),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["pixel_values"]
    assert (got - want).abs().max().item() <= 1e-6
    # The torchvision-backed CLIPImageProcessor resizes with a different kernel.
    torchvision_ref = transformers.CLIPImageProcessor(**CLIP_KWARGS)(square, return_tensors="pt")
    assert (got - torchvision_ref["pixel_values"]).abs().max().item() <= 2 / 255 + 1e-6
    # Padding is black and centred on the short side.
    edge = got[0, :, :, :4] if image.height > image.width else got[0, :, :4, :]
    assert edge.abs().max() == 0


# -- bad input -------------------------------------------------------------------------


def raises_input_error(processor, part, match: str):
    with pytest.raises(InputError, match=match):
        processor.apply_chat_template(
            user_turn(text("look"), part), add_generation_prompt=True, tokenize=True, return_dict=True
        )


def test_bad_images_name_the_part(ours):
    jpeg = Path(image_path(IMAGE_NAMES[2])).read_bytes()
    truncated, noise = jpeg[: len(jpeg) // 2], os.urandom(2048)
    raises_input_error(ours, {"type": "image", "image": truncated}, r"message 0, part 1: cannot decode")
    raises_input_error(ours, {"type": "image", "image": noise}, r"message 0, part 1: cannot decode")
    bomb = png_header_only(100_000, 100_000)
    raises_input_error(ours, {"type": "image", "image": bomb}, r"message 0, part 1: .*(too large|Mpx)")
    raises_input_error(ours, {"type": "video", "video": "x.mp4"}, r"message 0, part 1: unknown content type")
    raises_input_error(ours, {"type": "image", "path": "/no/such/file.png"}, r"no image file")
    raises_input_error(ours, {"type": "image"}, r"part 1: the image part has no")
    raises_input_error(ours, {"type": "image", "image": 3.5}, r"must be a PIL image")
    raises_input_error(ours, {"type": "image", "image": "data:image/png;base64,@@@"}, r"base64")
    # Nothing listens on the discard port: fails fast, without the network.
    raises_input_error(ours, {"type": "image", "url": "http://127.0.0.1:9/cat.png"}, r"cannot fetch")
    with pytest.raises(InputError, match="message 1: 'role'"):
        ours.apply_chat_template(
            [{"role": "user", "content": "a"}, {"content": "b"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )


def test_pixel_limit_and_disabled_sources(hf_dir):
    strict = FastVLMProcessor.from_pretrained(
        hf_dir, allow_remote_images=False, allow_local_images=False, max_image_pixels=10_000
    )
    raises_input_error(strict, {"type": "image", "image": Image.new("RGB", (200, 100))}, r"over the limit")
    raises_input_error(
        strict, {"type": "image", "url": "https://example.com/a.png"}, r"remote images is disabled"
    )
    raises_input_error(strict, {"type": "image", "path": image_path(IMAGE_NAMES[0])}, r"local image files")
    small = encode_image(Image.new("RGB", (50, 50)), "PNG")
    inputs = strict.apply_chat_template(
        user_turn({"type": "image", "image": small}),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert inputs["pixel_values"].shape == (1, 3, 1024, 1024)


def test_marker_mismatch_is_rejected(ours):
    with pytest.raises(InputError, match="marker"):
        ours.apply_chat_template(
            user_turn(text("sneaky <image> marker")),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
    with pytest.raises(InputError, match="marker"):
        ours(images=[Image.new("RGB", (8, 8))], text="no marker here")


def test_too_long_conversation_fails_before_images(ours):
    long_text = "word " * 33_000
    # The image bytes are garbage: the length check must come first.
    conversation = user_turn({"type": "image", "image": b"not an image"}, text(long_text))
    with pytest.raises(ContextLengthError, match="context of 32768"):
        ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    short = user_turn(text("word " * 32_000))
    with pytest.raises(ContextLengthError, match="plus 1000 new tokens"):
        ours.apply_chat_template(
            short, max_new_tokens=1000, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    assert (
        ours.apply_chat_template(
            short, check_length=False, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"].shape[1]
        > 32_000
    )


def test_templates_run_in_a_sandbox(ours):
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(CheckpointError, match="unsafe"):
        ours.apply_chat_template(
            user_turn(text("x")), chat_template=escape, tokenize=False, add_generation_prompt=True
        )


def test_template_errors_are_input_errors(ours):
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ messages|tojson }}"
    )
    conversation = [{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]
    with pytest.raises(InputError, match="one message only"):
        ours.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    rendered = ours.apply_chat_template(
        conversation[:1], chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert rendered == '[{"role": "user", "content": [{"type": "text", "text": "é"}]}]'
