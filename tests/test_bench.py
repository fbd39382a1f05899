"""``fastvlm bench`` runs end to end on a given checkpoint, against transformers."""

from __future__ import annotations

import json

import pytest

from fastvlm import cli


def test_bench_on_a_checkpoint_prints_a_table_and_json(tiny_checkpoint_dir, capsys):
    args = ["bench", "--model", str(tiny_checkpoint_dir), "--dtype", "fp32", "--repeats", "1"]
    assert cli.main([*args, "--new-tokens", "3", "--batch", "2", "--int8", "--int4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[2].startswith("| metric | transformers | fastvlm | fastvlm int8 | fastvlm int4 |")
    summary = json.loads(out[-1])
    assert set(summary["results"]) == {"transformers", "fastvlm", "fastvlm int8", "fastvlm int4"}
    for figures in summary["results"].values():
        assert set(figures) == {"vision_s", "ttft_s", "decode_tok_s", "batch_images_s"}
        assert all(value > 0 for value in figures.values())
    assert {"int8_accuracy", "int4_accuracy"} <= set(summary)


def test_bench_refuses_a_prompt_shorter_than_the_image(tiny_checkpoint_dir, capsys):
    args = ["bench", "--model", str(tiny_checkpoint_dir), "--no-reference", "--prompt-tokens", "3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a loading progress bar may come first
    assert err[-1].startswith("error: --prompt-tokens must be at least")


@pytest.mark.parametrize("flag", ["--int8", "--int4"])
def test_bench_without_reference(tiny_checkpoint_dir, capsys, flag):
    args = ["bench", "--model", str(tiny_checkpoint_dir), "--no-reference", "--repeats", "1", flag]
    assert cli.main([*args, "--new-tokens", "2", "--dtype", "bf16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["results"]) == {"fastvlm", f"fastvlm {flag[2:]}"}
