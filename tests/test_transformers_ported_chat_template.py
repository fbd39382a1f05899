"""Ports of the ``apply_chat_template`` checks of ``ProcessorTesterMixin``
(tests/test_processing_common.py) for ``FastVLMProcessor``, with transformers'
``LlavaProcessor`` on the same checkpoint files as the oracle. Each test names its original.
"""

from __future__ import annotations

import pytest
import torch

from fastvlm.errors import InputError
from ported_processor import PHOTO, assert_same, ours, ref, saved

__all__ = ["ours", "ref", "saved"]  # fixtures


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 2])
def test_apply_chat_template_image(ours, ref, batch_size):
    """ProcessorTesterMixin.test_apply_chat_template_image (_test_apply_chat_template with
    return_tensors="pt"), with a local image path where the original downloads a URL."""
    batch_messages = [
        [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
            {"role": "user", "content": [{"type": "text", "text": "Describe this."}]},
        ]
        for _ in range(batch_size)
    ]
    formatted_prompt = ours.apply_chat_template(batch_messages, add_generation_prompt=True, tokenize=False)
    assert len(formatted_prompt) == batch_size
    assert formatted_prompt == ref.apply_chat_template(
        batch_messages, add_generation_prompt=True, tokenize=False
    )
    tokenized = ours.apply_chat_template(
        batch_messages, add_generation_prompt=True, tokenize=True, return_tensors="pt"
    )
    expected = ours.tokenizer(formatted_prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
    assert expected.tolist() == tokenized.tolist()
    tokenized_100 = ours.apply_chat_template(
        batch_messages,
        add_generation_prompt=True,
        tokenize=True,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        max_length=100,
    )
    assert len(tokenized_100[0]) == 100
    out_dict_text = ours.apply_chat_template(
        batch_messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert {"input_ids", "attention_mask"} <= set(out_dict_text.keys())
    assert len(out_dict_text["input_ids"]) == len(out_dict_text["attention_mask"]) == batch_size
    for messages in batch_messages:
        messages[1]["content"] = [messages[1]["content"][0], {"type": "image", "path": PHOTO}]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    out_dict = ours.apply_chat_template(batch_messages, **kwargs)
    assert (
        len(out_dict["input_ids"])
        == len(out_dict["attention_mask"])
        == len(out_dict["pixel_values"])
        == batch_size
    )
    assert all(isinstance(value, torch.Tensor) for value in out_dict.values())
    assert_same(out_dict, ref.apply_chat_template(batch_messages, **kwargs))
    assistant_message = {"role": "assistant", "content": [{"type": "text", "text": "It is the sound of"}]}
    batch_messages = [messages + [assistant_message] for messages in batch_messages]
    for prompt in ours.apply_chat_template(batch_messages, continue_final_message=True, tokenize=False):
        assert prompt.endswith("It is the sound of")  # no `eos` token at the end


def test_chat_template_jinja_kwargs(ours, ref):
    """ProcessorTesterMixin.test_chat_template_jinja_kwargs: extra keyword arguments reach the template."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Which of these animals is making the sound?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "It is a cow."}]},
    ]
    dummy_template = (
        "{% for message in messages %}"
        "{% if add_system_prompt %}"
        "{{'You are a helpful assistant.'}}"
        "{% endif %}"
        "{% if (message['role'] != 'assistant') %}"
        "{{'<|special_start|>' + message['role'] + '\n' + message['content'][0]['text']"
        " + '<|special_end|>' + '\n'}}"
        "{% elif (message['role'] == 'assistant')%}"
        "{{'<|special_start|>' + message['role'] + '\n'}}"
        "{{message['content'][0]['text'] + '<|special_end|>' + '\n'}}"
        "{% endif %}"
        "{% endfor %}"
    )
    formatted_prompt = ours.apply_chat_template(
        messages, add_system_prompt=True, tokenize=False, chat_template=dummy_template
    )
    expected_prompt = (
        "You are a helpful assistant.<|special_start|>user\nWhich of these animals is making the sound?"
        "<|special_end|>\nYou are a helpful assistant.<|special_start|>assistant\n"
        "It is a cow.<|special_end|>\n"
    )
    assert formatted_prompt == expected_prompt
    assert formatted_prompt == ref.apply_chat_template(
        messages, add_system_prompt=True, tokenize=False, chat_template=dummy_template
    )


def test_apply_chat_template_assistant_mask(ours, ref):
    """ProcessorTesterMixin.test_apply_chat_template_assistant_mask (and transformers' masks
    on the same batch, left padded)."""
    turns = [
        ("user", "What is the capital of France?"),
        ("assistant", "The capital of France is Paris."),
        ("user", "What about Italy?"),
        ("assistant", "The capital of Italy is Rome."),
    ]
    conversation = [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]
    messages = [conversation, conversation[:2]]
    dummy_template = (
        "{% for message in messages %}"
        "{% if (message['role'] != 'assistant') %}"
        "{{'<|special_start|>' + message['role'] + '\n' + message['content'][0]['text']"
        " + '<|special_end|>' + '\n'}}"
        "{% elif (message['role'] == 'assistant')%}"
        "{{'<|special_start|>' + message['role'] + '\n'}}"
        "{% generation %}"
        "{{message['content'][0]['text'] + '<|special_end|>' + '\n'}}"
        "{% endgeneration %}"
        "{% endif %}"
        "{% endfor %}"
    )
    kwargs = dict(
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
        chat_template=dummy_template,
        padding=True,
    )
    inputs = ours.apply_chat_template(messages, **kwargs)
    assert "assistant_masks" in inputs and len(inputs["assistant_masks"]) == len(inputs["input_ids"])
    assistant_ids = inputs["input_ids"][0][inputs["assistant_masks"][0].bool()]
    assistant_text = (
        "The capital of France is Paris.<|special_end|>\nThe capital of Italy is Rome.<|special_end|>\n"
    )
    assert ours.decode(assistant_ids) == assistant_text
    expected = ref.apply_chat_template(messages, **kwargs)
    assert inputs["assistant_masks"].tolist() == torch.as_tensor(expected["assistant_masks"]).tolist()
    with pytest.raises(InputError, match="return_dict"):
        ours.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True)
