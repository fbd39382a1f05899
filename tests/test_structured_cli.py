"""Constrained answers from the command line: ``fastvlm run`` and ``fastvlm batch``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
from PIL import Image

import builders
import fastvlm
from fastvlm.cli import main

IMAGE = str(builders.shared_assets() / "images" / "waterview.jpg")
CPU = ["--dtype", "float32", "--device", "cpu"]
SCHEMA = {
    "type": "object",
    "properties": {
        "total": {"type": "integer", "minimum": 0, "maximum": 999},
        "paid": {"type": "boolean"},
        "text": {"enum": ["cash", "card"]},  # a property named like a column of the output
        "items": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["total", "paid", "text", "items"],
    "additionalProperties": False,
}


@pytest.fixture
def schema_file(tmp_path) -> str:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.slow
def test_run_prints_the_json(tiny_checkpoint_dir, schema_file, capsys):
    model = ["--model", str(tiny_checkpoint_dir), *CPU, "--max-new-tokens", "48"]
    status, out, _ = run(capsys, "run", IMAGE, "Read the receipt.", *model, "--json-schema", schema_file)
    assert status == 0
    jsonschema.validate(json.loads(out), SCHEMA)
    status, out, _ = run(capsys, "run", IMAGE, "Read it.", *model, "--json-schema", schema_file, "--json")
    result = json.loads(out)
    assert (
        status == 0 and result["finish_reason"] == "stop" and result["parsed"] == json.loads(result["text"])
    )
    status, out, _ = run(
        capsys, "run", IMAGE, "Which?", *model, "--choice", "cat", "--choice", "dog", "--json"
    )
    assert status == 0 and json.loads(out)["parsed"] in ("cat", "dog")
    status, out, _ = run(capsys, "run", "none", "Code?", *model, "--regex", "[A-Z]{2}[0-9]{2}")
    assert status == 0 and re.fullmatch("[A-Z]{2}[0-9]{2}", out.strip())


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read the JSON-schema file"),
        ("{oops", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"type": "array", "contains": {"type": "integer"}}', "unsupported JSON-schema keyword 'contains'"),
    ],
)
def test_bad_schema_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    for command in (["run", IMAGE, "x"], ["batch", str(tmp_path), "--output", str(tmp_path / "o.jsonl")]):
        status, _, err = run(
            capsys, *command, "--model", str(tmp_path / "no-model"), "--json-schema", str(path)
        )
        assert status == 2 and err.count("\n") == 1 and message in err, err


def test_run_refuses_two_constraints(capsys, schema_file):
    status, _, err = run(capsys, "run", IMAGE, "x", "--json-schema", schema_file, "--regex", "a")
    assert status == 2 and "not allowed with" in err


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_batch_extracts_properties_into_columns(tiny_checkpoint_dir, tmp_path, schema_file, capsys, suffix):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 30), (i * 80, 20, 200)).save(folder / f"img{i}.png")
    out = tmp_path / f"o{suffix}"
    argv = ["batch", str(folder), "--output", str(out), "--model", str(tiny_checkpoint_dir), *CPU]
    argv += ["--max-new-tokens", "48", "--no-progress", "--json-schema", schema_file]
    assert main(argv) == 0
    capsys.readouterr()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3
    for row in rows:
        assert row["finish_reason"] == "stop"
        parsed = json.loads(row["parsed"])
        jsonschema.validate(parsed, SCHEMA)
        assert (row["total"], row["paid"], row["parsed_text"]) == (
            parsed["total"],
            parsed["paid"],
            parsed["text"],
        )
        assert json.loads(row["items"]) == parsed["items"]
        assert row["text"] == row["parsed"]  # the answer itself, as before


@pytest.mark.slow
def test_run_batch_rows_equal_ask(tiny_checkpoint_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "a.png")
    out = tmp_path / "o.jsonl"
    options = {"device": "cpu", "dtype": "float32", "max_new_tokens": 8, "progress": False}
    fastvlm.run_batch([str(folder)], out, model=str(tiny_checkpoint_dir), choices=["yes", "no"], **options)
    row = json.loads(out.read_text())
    vlm = fastvlm.load(tiny_checkpoint_dir, device="cpu", dtype="float32", progress=False)
    answer = vlm.ask(
        str(Path(folder / "a.png")), "Describe the image.", choices=["yes", "no"], max_new_tokens=8
    )
    assert row["parsed"] == row["text"] == answer == answer.parsed
