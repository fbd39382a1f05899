"""FastVLMProcessor: chat messages with images -> model inputs; generated ids -> text.

For a Hugging Face checkpoint it gives what transformers' LlavaProcessor gives for the
same conversation; for an Apple checkpoint, what Apple's llava code feeds the model
(``conv_qwen_2`` prompt, padded-square images), with the -200 image marker replaced by
``num_image_tokens`` copies of ``image_token_id``. It knows nothing about weights,
devices or generation: its outputs are CPU tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..checkpoints.files import read_config_json
from ..checkpoints.hub import resolve_checkpoint
from ..checkpoints.writer import check_save_options
from ..config import Format, detect_format
from ..errors import ContextLengthError, InputError
from .assistant_mask import build_assistant_masks
from .batch import BatchInputs, MultiModalData, pixels_as
from .call_options import parse_call_options
from .chat_template import render_chat_template, render_with_generation_spans
from .constants import DEFAULT_MAX_IMAGE_PIXELS
from .image_transforms import ImageSettings, normalize_pixels, resize_and_crop
from .images import ImageLoadOptions, ImageSource, load_rgb_image
from .messages import ImageRef, ParsedConversation, is_batch, parse_conversation
from .processor_files import save_processor
from .settings import ProcessorSettings, load_settings
from .text_options import (
    RenderOptions,
    TextOptions,
    check_image_tokens,
    check_markers,
    cut_at_final_message,
    mark_final_message,
)
from .tokenizer import Padding, PaddingSide, Qwen2Tokenizer, Truncation


class FastVLMProcessor:
    """Turns conversations into ``{input_ids, attention_mask, pixel_values}``.

    ``pixel_values`` is float32 (N, 3, H, W) for all images of the batch in order; it is
    absent when there are no images. Batches are padded on ``tokenizer.padding_side``
    ("left" by default).
    """

    def __init__(
        self,
        tokenizer: Qwen2Tokenizer,
        settings: ProcessorSettings,
        image_options: ImageLoadOptions | None = None,
    ):
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_options = image_options or ImageLoadOptions()

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        revision: str | None = None,
        allow_remote_images: bool = True,
        allow_local_images: bool = True,
        allow_private_image_hosts: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        padding_side: PaddingSide = "left",
    ) -> FastVLMProcessor:
        """Load from a checkpoint folder or a hub id (either layout)."""
        folder = resolve_checkpoint(src, revision=revision)
        config = read_config_json(folder)
        fmt = detect_format(config)
        tokenizer = Qwen2Tokenizer.from_dir(folder, padding_side=padding_side)
        settings = load_settings(folder, config, fmt, tokenizer)
        options = ImageLoadOptions(
            allow_remote=allow_remote_images,
            allow_local_files=allow_local_images,
            allow_private_hosts=allow_private_image_hosts,
            max_pixels=max_image_pixels,
        )
        return cls(tokenizer, settings, options)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the tokenizer, chat template and image settings as transformers'
        LlavaProcessor saves them (``AutoProcessor`` loads the folder); returns the files.
        An Apple-layout processor is refused (its padded-square images have no CLIP form)."""
        check_save_options(kwargs)
        return save_processor(self.tokenizer, self.settings, save_directory)

    # -- what the model needs to know ------------------------------------------------

    @property
    def format(self) -> Format:
        """ "fast_vlm" (Hugging Face layout) or "llava_qwen2" (Apple layout)."""
        return self.settings.format

    @property
    def image_token(self) -> str:
        """The image marker in prompt text, "<image>"."""
        return self.settings.image_token

    @property
    def image_token_id(self) -> int:
        """The placeholder id the model replaces with image features."""
        return self.settings.image_token_id

    @property
    def num_image_tokens(self) -> int:
        """Placeholder ids per image (256 for 1024x1024 images)."""
        return self.settings.num_image_tokens

    @property
    def max_length(self) -> int | None:
        """The model's context length in tokens, None if the checkpoint does not say."""
        return self.settings.max_length

    @property
    def chat_template(self) -> str:
        return self.settings.chat_template

    @chat_template.setter
    def chat_template(self, template: str) -> None:
        if not isinstance(template, str):
            raise InputError(f"chat_template must be a string, not {type(template).__name__}")
        self.settings = replace(self.settings, chat_template=template)

    @property
    def model_input_names(self) -> list[str]:
        """The keys a call returns (with images), as transformers' processors list them."""
        return ["input_ids", "attention_mask", "pixel_values"]

    @property
    def image_settings(self) -> ImageSettings:
        return self.settings.image

    # -- conversations ----------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: Any,
        chat_template: str | None = None,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "pt",
        padding: Padding = True,
        truncation: Truncation = False,
        max_length: int | None = None,
        add_special_tokens: bool = False,
        max_new_tokens: int = 0,
        check_length: bool = True,
        uint8_pixels: bool = False,
        context_length: int | None = None,
        return_assistant_tokens_mask: bool = False,
        **template_kwargs: Any,
    ) -> BatchInputs | torch.Tensor | list | str:
        """Render one conversation or a list of them, as transformers' processors do: by
        default the prompt string (a list for a batch); with ``tokenize=True`` the ids, or
        with ``return_dict=True`` also the mask and the images' pixels.

        ``continue_final_message`` leaves the last message open (no end-of-turn tokens),
        for the model to continue it. Extra keyword arguments reach the template as
        variables. With ``check_length``, a prompt that with ``max_new_tokens`` more
        tokens would not fit ``max_length`` (or ``context_length``, when a caller such as an
        engine has a smaller limit) raises ContextLengthError before any image is decoded.
        With ``uint8_pixels``, ``pixel_values`` are the resized and cropped uint8
        pixels (a quarter of the size); ``normalize_pixels`` turns them into the float32
        ones. A message's content may be a plain string; the reference renders such
        content as nothing with the FastVLM template, here it is one text part. With
        ``return_assistant_tokens_mask`` (and ``return_dict``), ``assistant_masks`` marks the
        tokens the template's ``{% generation %}`` blocks wrote, as in transformers.
        """
        if continue_final_message and add_generation_prompt:
            raise InputError(
                "continue_final_message and add_generation_prompt are not compatible; pass one of them"
            )
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise InputError("return_assistant_tokens_mask needs tokenize=True and return_dict=True")
        batched = is_batch(conversation)
        conversations = list(conversation) if batched else [conversation]
        parsed = [
            parse_conversation(c, f"conversation {i}, " if batched else "")
            for i, c in enumerate(conversations)
        ]
        options = RenderOptions(add_generation_prompt, continue_final_message, chat_template, template_kwargs)
        rendered = [self._render(p, options, return_assistant_tokens_mask) for p in parsed]
        prompts = [prompt for prompt, _ in rendered]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [ref for p in parsed for ref in p.images]
        check_markers(prompts, [len(p.images) for p in parsed], self.image_token, batched)
        text = TextOptions(return_tensors, padding, truncation, max_length, add_special_tokens)
        limit = context_length if check_length else None
        out = self._build(
            prompts, images, batched, text, max_new_tokens, check_length, uint8_pixels, limit=limit
        )
        if return_assistant_tokens_mask:
            spans = [prompt_spans for _, prompt_spans in rendered]
            length = len(out["input_ids"][0]) if len(out["input_ids"]) else 0
            out["assistant_masks"] = build_assistant_masks(
                self.tokenizer, prompts, spans, self.image_token, self.num_image_tokens, text, length
            )
        return out if return_dict else out["input_ids"]

    def __call__(
        self,
        images: ImageSource | Sequence[Any] | None = None,
        text: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> BatchInputs:
        """Like LlavaProcessor: ``text`` holds one ``<image>`` marker per image, in order.

        Options, flat or grouped as transformers takes them (``text_kwargs``,
        ``images_kwargs``, ``common_kwargs``): ``return_tensors`` ("pt", "np" or None),
        ``padding``, ``truncation``, ``max_length``, ``add_special_tokens``; the image
        steps after resizing (``do_rescale``, ``rescale_factor``, ``do_normalize``,
        ``image_mean``, ``image_std``); and ours, ``max_new_tokens`` with ``check_length``
        (the context-length check). ``truncation`` cuts prompts on
        ``tokenizer.truncation_side`` but, as in transformers, never through image placeholders.
        """
        options = parse_call_options(kwargs, self.settings.image)
        refs = [ImageRef(src, f"image {i}") for i, src in enumerate(_flatten_images(images))]
        if text is None:
            if not refs:
                raise InputError("pass text, images or both")
            pixels = self._pixels(refs, settings=options.image)
            return BatchInputs(pixel_values=pixels_as(pixels, options.text.return_tensors))
        prompts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(p, str) for p in prompts):
            raise InputError("text must be a string or a list of strings")
        markers = sum(p.count(self.image_token) for p in prompts)
        if markers != len(refs):
            raise InputError(
                f"the text has {markers} {self.image_token!r} marker(s) but {len(refs)} image(s) were given; "
                "put one marker per image"
            )
        batched = not isinstance(text, str)
        return self._build(
            prompts, refs, batched, options.text, options.max_new_tokens, options.check_length,
            image=options.image,
        )  # fmt: skip

    def _get_num_multimodal_tokens(
        self, image_sizes: Sequence[Any] | None = None, **kwargs: Any
    ) -> MultiModalData:
        """Placeholder tokens per image, for serving code that asks processors (as vLLM
        does). Every image is resized to the same square, so each costs the same."""
        if image_sizes is None:
            return MultiModalData()
        count = len(image_sizes)
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * count, num_image_patches=[1] * count)

    # -- the pieces, usable on their own -----------------------------------------------

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, each image marker expanded to
        ``num_image_tokens`` copies of ``image_token_id``."""
        chunks = prompt.split(self.image_token)
        # Encoding the pieces between markers separately equals encoding the whole
        # prompt with <image> as a special token (added tokens split the text the same
        # way), and it also works for Apple tokenizers that lack <image>.
        ids = self.tokenizer.encode(chunks[0], add_special_tokens=False)
        for chunk in chunks[1:]:
            ids += [self.image_token_id] * self.num_image_tokens
            ids += self.tokenizer.encode(chunk, add_special_tokens=False)
        return ids

    def preprocess_images(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Images (any supported source) -> float32 tensor (N, 3, H, W)."""
        refs = [ImageRef(src, f"image {i}") for i, src in enumerate(images)]
        return self._pixels(refs)

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (N, 3, H, W) from ``uint8_pixels=True`` -> float32, exactly as without it."""
        return normalize_pixels(pixels, self.settings.image)

    def check_length(
        self,
        num_tokens: int,
        max_new_tokens: int = 0,
        where: str = "",
        *,
        limit: int | None = None,
        num_images: int = 0,
    ) -> None:
        """Raise ContextLengthError if ``num_tokens + max_new_tokens`` exceeds the context
        (``limit`` when given and lower than the model's); the message counts the tokens
        of the prompt's ``num_images`` images, since they are often most of it."""
        context = self.max_length if limit is None or self.max_length is None else min(limit, self.max_length)
        if context is None or num_tokens + max_new_tokens <= context:
            return
        owner = "the model's context" if context == self.max_length else "the context limit"
        extra = f" plus {max_new_tokens} new tokens" if max_new_tokens else ""
        if num_images:
            plural = "s take" if num_images > 1 else " takes"
            extra = f" ({num_images} image{plural} {num_images * self.num_image_tokens} of them){extra}"
        raise ContextLengthError(
            f"{where}the prompt is {num_tokens} tokens{extra}, over {owner} of {context} tokens; "
            "shorten the conversation, send fewer images or ask for fewer new tokens"
        )

    def decode(self, ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """``kwargs``: ``clean_up_tokenization_spaces``, as the tokenizer takes it."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    # -- internals --------------------------------------------------------------------

    def _render(
        self, parsed: ParsedConversation, options: RenderOptions, spans: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The prompt, and with ``spans`` its {% generation %} character spans."""
        messages = parsed.messages
        if options.continue_final_message:
            messages = mark_final_message(messages)
        render = render_with_generation_spans if spans else render_chat_template
        out = render(
            options.chat_template or self.chat_template,
            messages,
            add_generation_prompt=options.add_generation_prompt,
            special_tokens={**self.tokenizer.special_tokens_map, **options.template_kwargs},
        )
        prompt, found = out if spans else (out, [])
        return (cut_at_final_message(prompt) if options.continue_final_message else prompt), found

    def _build(
        self,
        prompts: list[str],
        refs: list[ImageRef],
        batched: bool,
        text: TextOptions,
        max_new_tokens: int,
        check_length: bool,
        uint8_pixels: bool = False,
        limit: int | None = None,
        image: ImageSettings | None = None,
    ) -> BatchInputs:
        sequences = [self.encode_prompt(p) for p in prompts]
        if text.add_special_tokens:  # what the tokenizer adds around any text (nothing for Qwen2)
            specials = self.tokenizer.encode("", add_special_tokens=True)
            sequences = [specials + ids for ids in sequences]
        if check_length:
            for index, (prompt, ids) in enumerate(zip(prompts, sequences, strict=True)):
                where = f"conversation {index}: " if batched else ""
                images = prompt.count(self.image_token)
                self.check_length(len(ids), max_new_tokens, where, limit=limit, num_images=images)
        if text.truncation not in (False, None, "do_not_truncate"):
            sequences = self.tokenizer.truncate(sequences, text.truncation, text.max_length)
            check_image_tokens(
                prompts, sequences, self.image_token, self.image_token_id, self.num_image_tokens
            )
        input_ids, attention_mask = self.tokenizer.pad(
            sequences, return_tensors=text.return_tensors, padding=text.padding, max_length=text.max_length
        )
        out = BatchInputs(input_ids=input_ids, attention_mask=attention_mask)
        if refs:
            pixels = self._pixels(refs, uint8_pixels, image)
            out["pixel_values"] = pixels_as(pixels, text.return_tensors)
        return out

    def _pixels(
        self, refs: list[ImageRef], uint8_pixels: bool = False, settings: ImageSettings | None = None
    ) -> torch.Tensor:
        tensors = []
        for ref in refs:
            if ref.source is None:
                raise InputError(
                    f"{ref.where}: the image part has no 'image', 'url', 'path' or 'base64' value"
                )
            image = load_rgb_image(ref.source, self.image_options, self.settings.rgb_rules, ref.where)
            tensors.append(resize_and_crop(image, self.settings.image))
        if not tensors:
            height, width = self.settings.image.output_size
            return torch.empty(0, 3, height, width, dtype=torch.uint8 if uint8_pixels else torch.float32)
        pixels = torch.stack(tensors)  # (N, 3, H, W) uint8
        return pixels if uint8_pixels else normalize_pixels(pixels, settings or self.settings.image)

    def __repr__(self) -> str:
        return (
            f"FastVLMProcessor(format={self.format!r}, image_token_id={self.image_token_id}, "
            f"num_image_tokens={self.num_image_tokens}, max_length={self.max_length}, "
            f"image_size={self.settings.image.output_size})"
        )


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in _flatten_images(item)]
    return [images]
