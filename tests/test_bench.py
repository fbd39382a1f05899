"""``fastvlm bench`` runs end to end on a given checkpoint, against transformers."""

from __future__ import annotations

import json

import pytest

from fastvlm import cli

ENTRY_POINTS = ["fastvlm.load", "from_pretrained"]
ACCURACY_KEYS = {
    "logits_max_rel_diff",
    "top1_agreement_prompt",
    "greedy_tokens_equal",
    "greedy_common_prefix",
    "greedy_tokens",
}
# Bounds for the tiny random-weight checkpoint; a broken quantiser lands near 1.0 / 0.0.
# Measured: int8 0.014 / 0.99 / 64 of 64, int4 0.25 / 0.91 / 54 of 64.
LIMITS = {"int8": (0.05, 0.95, 0.75), "int4": (0.5, 0.75, 0.25)}


def check_accuracy(bits: str, figures: dict) -> None:
    max_rel_diff, min_top1, min_equal_share = LIMITS[bits]
    assert set(figures) == ACCURACY_KEYS
    assert 0 < figures["logits_max_rel_diff"] <= max_rel_diff, figures
    assert min_top1 <= figures["top1_agreement_prompt"] <= 1, figures
    n = figures["greedy_tokens"]
    assert n > 0 and 0 <= figures["greedy_common_prefix"] <= figures["greedy_tokens_equal"] <= n
    assert figures["greedy_tokens_equal"] >= min_equal_share * n, figures


@pytest.mark.slow
def test_bench_measures_each_entry_point_and_prints_a_table_and_json(tiny_checkpoint_dir, capsys):
    args = ["bench", "--model", str(tiny_checkpoint_dir), "--dtype", "fp32", "--repeats", "1", "--plain"]
    # Enough new tokens that decoding outlasts the timing jitter of the prefill it is measured against.
    assert cli.main([*args, "--new-tokens", "16", "--batch", "2", "--int8", "--int4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    names = ["transformers", *ENTRY_POINTS, "plain", "int8", "int4"]
    assert out[2] == "| metric | " + " | ".join(names) + " |"
    summary = json.loads(out[-1])
    assert list(summary["results"]) == names
    for figures in summary["results"].values():
        assert set(figures) == {"vision_s", "ttft_s", "prefill_s", "decode_tok_s", "batch_images_s"}
        assert all(value > 0 for value in figures.values())
    for bits in ("int8", "int4"):
        check_accuracy(bits, summary[f"{bits}_accuracy"])
    assert summary["int8_accuracy"]["logits_max_rel_diff"] < summary["int4_accuracy"]["logits_max_rel_diff"]


def test_bench_refuses_a_prompt_shorter_than_the_image(tiny_checkpoint_dir, capsys):
    args = ["bench", "--model", str(tiny_checkpoint_dir), "--no-reference", "--prompt-tokens", "3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prompt-tokens must be at least")  # before loading


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--int8", "--int4"])
def test_bench_without_reference(tiny_checkpoint_dir, capsys, flag):
    args = ["bench", "--model", str(tiny_checkpoint_dir), "--no-reference", "--repeats", "1", flag]
    assert cli.main([*args, "--new-tokens", "2", "--dtype", "bf16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["results"]) == [*ENTRY_POINTS, flag[2:]]
    assert set(summary[f"{flag[2:]}_accuracy"]) == ACCURACY_KEYS


def test_bench_without_the_reference_libraries_says_which_extra(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] in ("transformers", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    assert cli.main(["bench", "--size", "0.5b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'fastvlm[bench]'" in err[0]
    assert cli.main(["bench", "--no-reference"]) == 2  # random weights are made by transformers
    assert "pass --model" in capsys.readouterr().err
