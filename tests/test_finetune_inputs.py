"""Bad fine-tuning input stops with one line (exit 2) before training, and loses nothing."""

from __future__ import annotations

import json

import pytest

from finetune_helpers import finetune, losses, write_dataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs")
    write_dataset(path)
    return path


def _rows(folder, name: str, rows: list) -> object:
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {
    "image": "img/0.png",
    "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo"}],
}


def _fails(capsys, ckpt, data, out, *extra, needle: str, existed: bool = False) -> None:
    assert finetune(ckpt, data, out, "--max-steps", "1", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert existed or not out.exists()  # stopped before writing anything


def test_missing_data_file(tiny_checkpoint_dir, folder, tmp_path, capsys):
    _fails(capsys, tiny_checkpoint_dir, folder / "nope.jsonl", tmp_path / "o", needle="does not exist")


def test_malformed_jsonl_names_its_line(tiny_checkpoint_dir, folder, tmp_path, capsys):
    data = _rows(folder, "bad.jsonl", [GOOD, GOOD, '{"conversations": [}'])
    _fails(capsys, tiny_checkpoint_dir, data, tmp_path / "o", needle="bad.jsonl:3: not valid JSON")


def test_malformed_json_array_names_its_line(tiny_checkpoint_dir, folder, tmp_path, capsys):
    (folder / "bad.json").write_text("[\n" + json.dumps(GOOD) + ",\n{oops}\n]")
    _fails(
        capsys, tiny_checkpoint_dir, folder / "bad.json", tmp_path / "o", needle="bad.json:3: not valid JSON"
    )


def test_missing_image(tiny_checkpoint_dir, folder, tmp_path, capsys):
    data = _rows(folder, "noimg.jsonl", [GOOD, {**GOOD, "image": "img/missing.png"}])
    _fails(capsys, tiny_checkpoint_dir, data, tmp_path / "o", needle="image 'img/missing.png' not found")


def test_no_assistant_turn(tiny_checkpoint_dir, folder, tmp_path, capsys):
    data = _rows(folder, "noans.jsonl", [GOOD, {"conversations": [{"from": "human", "value": "Hi"}]}])
    _fails(capsys, tiny_checkpoint_dir, data, tmp_path / "o", needle="no assistant turn")


def test_unknown_lora_target(tiny_checkpoint_dir, folder, tmp_path, capsys):
    data = folder / "train.jsonl"
    _fails(capsys, tiny_checkpoint_dir, data, tmp_path / "o", "--lora-targets", "q_proj,qkv", needle="'qkv'")


def test_row_longer_than_max_length(tiny_checkpoint_dir, folder, tmp_path, capsys):
    data = folder / "train.jsonl"
    _fails(
        capsys, tiny_checkpoint_dir, data, tmp_path / "o", "--max-length", "10", needle="over --max-length 10"
    )


def test_skip_bad_rows_counts_them(tiny_checkpoint_dir, folder, tmp_path, capsys):
    bad = [{**GOOD, "image": "img/missing.png"}, {"conversations": [{"from": "human", "value": "Hi"}]}]
    data = _rows(folder, "mixed.jsonl", [GOOD, *bad, GOOD])
    assert finetune(tiny_checkpoint_dir, data, tmp_path / "o", "--max-steps", "1", "--skip-bad-rows") == 0
    assert "skipped 2 bad row(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_saved_checkpoint_is_never_overwritten_without_resume(tiny_checkpoint_dir, folder, tmp_path, capsys):
    out, data = tmp_path / "o", folder / "train.jsonl"
    assert finetune(tiny_checkpoint_dir, data, out, "--max-steps", "1") == 0
    before = (out / "checkpoint" / "trainable.safetensors").read_bytes()
    capsys.readouterr()
    _fails(capsys, tiny_checkpoint_dir, data, out, needle="already holds a training checkpoint", existed=True)
    assert (out / "checkpoint" / "trainable.safetensors").read_bytes() == before
    _fails(capsys, tiny_checkpoint_dir, data, tmp_path / "fresh", "--resume", needle="no checkpoint")


def test_chat_rows_and_text_only_rows_train(tiny_checkpoint_dir, folder, tmp_path):
    image_turn = [{"type": "image", "image": "img/1.png"}, {"type": "text", "text": "Colour?"}]
    rows = [
        {"messages": [{"role": "user", "content": image_turn}, {"role": "assistant", "content": "Green."}]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}]},
        {"conversations": [{"from": "human", "value": "No image"}, {"from": "gpt", "value": "Fine"}]},
        GOOD,
    ]
    data = _rows(folder, "chat.jsonl", rows)
    out = tmp_path / "o"
    assert finetune(tiny_checkpoint_dir, data, out, "--max-steps", "2", "--batch-size", "2") == 0
    assert len(losses(out)) == 2
