"""Generation settings with transformers' ``GenerationConfig`` names and precedence.

Precedence, as in transformers: arguments to ``generate`` (or the ``generation_config``
object passed there) > the checkpoint's ``generation_config.json`` > library defaults.
A transformers ``GenerationConfig`` works wherever ours does (it is read through
``to_dict()``), so this module never imports transformers.

Arguments that transformers knows but we do not implement raise one ``InputError``
naming them, instead of being ignored or failing deep inside the loop.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InputError


@dataclass
class GenerationConfig:
    """The subset of transformers' GenerationConfig that ``generate`` implements.

    ``None`` means "not set here": the next source in the precedence chain decides.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    num_beams: int | None = None
    num_return_sequences: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    remove_invalid_values: bool | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool | None = None
    return_dict_in_generate: bool | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = True) -> GenerationConfig:
        """Known keys only. ``strict``: a transformers option we do not implement, set to a
        non-default value, raises; otherwise (checkpoint files) it only warns."""
        check_unsupported(data, strict=strict)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> GenerationConfig:
        """The checkpoint's ``generation_config.json``, or an empty config if it has none."""
        path = Path(folder) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
        return cls.from_dict(data, strict=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def update(self, **kwargs: Any) -> GenerationConfig:
        """A copy with every non-None value of ``kwargs`` set (all keys must be fields)."""
        out = copy.deepcopy(self)
        for key, value in kwargs.items():
            if value is not None:
                setattr(out, key, value)
        return out

    def fill_from(self, other: GenerationConfig) -> GenerationConfig:
        """A copy where fields still None take ``other``'s value."""
        return self.update(**{k: v for k, v in other.to_dict().items() if getattr(self, k) is None})


# The values transformers falls back to when neither the caller nor the checkpoint sets one.
DEFAULTS = GenerationConfig(
    max_length=20,
    min_length=0,
    do_sample=False,
    num_beams=1,
    num_return_sequences=1,
    temperature=1.0,
    top_k=50,
    top_p=1.0,
    repetition_penalty=1.0,
    length_penalty=1.0,
    early_stopping=False,
    no_repeat_ngram_size=0,
    remove_invalid_values=False,
    use_cache=True,
    return_dict_in_generate=False,
    output_scores=False,
    output_logits=False,
)

# transformers generation options we do not implement, with the value that means "off".
_UNSUPPORTED_OFF: dict[str, Any] = {
    "output_attentions": False,
    "output_hidden_states": False,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "dola_layers": None,  # transformers runs DoLa as hub code (transformers-community/dola)
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "guidance_scale": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "renormalize_logits": False,
    "stop_strings": None,
    "max_time": None,
    "low_memory": None,
    "watermarking_config": None,
    "prompt_lookup_num_tokens": None,
    "assistant_model": None,
    "assistant_tokenizer": None,
    "streamer": None,
    "prefix_allowed_tokens_fn": None,
    "negative_prompt_ids": None,
    "negative_prompt_attention_mask": None,
    "synced_gpus": None,
    "tokenizer": None,
    "constraints": None,
    "force_words_ids": None,
    "compile_config": None,
    "past_key_values": None,
    "decoder_start_token_id": None,
}
# Keys a saved transformers GenerationConfig carries that say nothing about decoding.
_BOOKKEEPING = {
    "transformers_version",
    "_from_model_config",
    "cache_implementation",
    "cache_config",
    "return_legacy_cache",
    "is_assistant",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "assistant_lookbehind",
    "target_lookbehind",
    "assistant_early_exit",
    "token_healing",
    "disable_compile",
    "trust_remote_code",
    "output_past_key_values",
    "generation_kwargs",
    "base_model_tp_plan",
}


def check_unsupported(data: dict[str, Any], *, strict: bool) -> None:
    """Raise (or warn, if not ``strict``) naming the first option we cannot honour."""
    known = {f.name for f in fields(GenerationConfig)}
    for key, value in data.items():
        if value is None or key in known or key in _BOOKKEEPING:
            continue
        if key in _UNSUPPORTED_OFF:
            if value == _UNSUPPORTED_OFF[key]:
                continue
            message = f"generate does not support {key}={value!r}; leave it unset"
        elif not strict:
            continue  # an option from a newer transformers that we do not know
        else:
            message = f"generate got an unknown argument {key!r}; see GenerationConfig for the options"
        if strict:
            raise InputError(message)
        warnings.warn(f"generation_config.json: {message} (ignored)", stacklevel=3)


def as_generation_config(value: Any) -> GenerationConfig:
    """Ours, a transformers GenerationConfig, or a plain dict -> ours (unsupported options raise)."""
    if value is None:
        return GenerationConfig()
    if isinstance(value, GenerationConfig):
        return copy.deepcopy(value)
    data = value if isinstance(value, dict) else getattr(value, "to_dict", lambda: None)()
    if not isinstance(data, dict):
        raise InputError(
            f"generation_config must be a GenerationConfig or a dict, not {type(value).__name__}"
        )
    # A transformers config lists every option with its off value; only real settings matter.
    return GenerationConfig.from_dict(data, strict=True)


def checkpoint_generation_config(model: Any) -> GenerationConfig:
    """The model's generation defaults: its ``generation_config`` if it has one, else the
    ``generation_config.json`` of the folder it was loaded from, else the model config's ids."""
    attached = getattr(model, "generation_config", None)
    if attached is not None:
        base = as_generation_config(attached)
    else:
        source = getattr(model, "source", None)
        base = GenerationConfig.from_pretrained(source) if source else GenerationConfig()
    config = getattr(model, "config", None)
    ids = GenerationConfig(
        eos_token_id=getattr(config, "eos_token_id", None), pad_token_id=getattr(config, "pad_token_id", None)
    )
    return base.fill_from(ids)


def resolve_generation_config(
    model: Any, generation_config: Any = None, **kwargs: Any
) -> tuple[GenerationConfig, set[str]]:
    """Merge caller > checkpoint > defaults. Returns the config and the names that the
    caller or the checkpoint set (transformers treats a length nobody set differently)."""
    check_unsupported(kwargs, strict=True)
    names = {f.name for f in fields(GenerationConfig)}
    caller = as_generation_config(generation_config).update(**{k: v for k, v in kwargs.items() if k in names})
    checkpoint = checkpoint_generation_config(model)
    set_by = {k for k, v in caller.to_dict().items() if v is not None}
    set_by |= {k for k, v in checkpoint.to_dict().items() if v is not None}
    merged = caller.fill_from(checkpoint).fill_from(DEFAULTS)
    validate(merged)
    return merged, set_by


def validate(cfg: GenerationConfig) -> None:
    """One clear line for settings transformers rejects too."""
    checks = [
        (cfg.num_beams >= 1, f"num_beams must be >= 1, not {cfg.num_beams}"),
        (cfg.num_return_sequences >= 1, f"num_return_sequences must be >= 1, not {cfg.num_return_sequences}"),
        (
            cfg.num_return_sequences == 1 or cfg.do_sample or cfg.num_beams > 1,
            "greedy decoding (do_sample=False, num_beams=1) gives one sequence per prompt; "
            f"num_return_sequences={cfg.num_return_sequences} needs do_sample=True or num_beams > 1",
        ),
        (
            cfg.num_beams == 1 or cfg.num_return_sequences <= cfg.num_beams,
            f"num_return_sequences ({cfg.num_return_sequences}) must be <= num_beams ({cfg.num_beams})",
        ),
        (cfg.temperature > 0, f"temperature must be > 0, not {cfg.temperature}"),
        (cfg.top_k >= 0, f"top_k must be >= 0, not {cfg.top_k}"),
        (0 <= cfg.top_p <= 1, f"top_p must be in [0, 1], not {cfg.top_p}"),
        (cfg.min_p is None or 0 <= cfg.min_p <= 1, f"min_p must be in [0, 1], not {cfg.min_p}"),
        (cfg.repetition_penalty > 0, f"repetition_penalty must be > 0, not {cfg.repetition_penalty}"),
        (cfg.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, not {cfg.no_repeat_ngram_size}"),
        (
            cfg.early_stopping in (True, False, "never"),
            f"early_stopping must be True, False or 'never', not {cfg.early_stopping!r}",
        ),
        (
            cfg.max_new_tokens is None or cfg.max_new_tokens >= 0,
            f"max_new_tokens must be >= 0, not {cfg.max_new_tokens}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    bad = cfg.bad_words_ids
    if bad is not None and (
        not isinstance(bad, list)
        or not bad
        or not all(isinstance(w, list) and w and all(isinstance(t, int) and t >= 0 for t in w) for w in bad)
    ):
        raise InputError("bad_words_ids must be a non-empty list of non-empty lists of token ids")
