"""``fastvlm batch`` / ``run_batch`` in local mode: inputs, outputs, per-row errors, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import fastvlm
from builders import shared_assets
from fastvlm.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
OPTIONS = {"device": "cpu", "dtype": "float32", "max_new_tokens": 6, "progress": False}
PROMPT = "Describe the image."


def make_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img{i:03d}.png"
        Image.new("RGB", (40 + i, 30), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(path)
        paths.append(path)
    return paths


def read_rows(out: Path) -> list[dict]:
    if out.suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        rows = pq.read_table(out).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def vlm(tiny_checkpoint_dir):
    return fastvlm.load(tiny_checkpoint_dir, device="cpu", dtype="float32", progress=False)


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder: two real photos, a nested tiny image, and a file that is not an image."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for name in ("waterview.jpg", "000000039769.png"):
        shutil.copy(shared_assets() / "images" / name, folder / name)
    make_images(folder / "nested", 1)
    (folder / "notes.txt").write_text("skipped: not an image extension")
    return folder


@pytest.mark.slow
def test_folder_rows_equal_ask(vlm, tiny_checkpoint_dir, photos, tmp_path):
    out = tmp_path / "out.parquet"
    summary = fastvlm.run_batch([str(photos)], out, model=str(tiny_checkpoint_dir), **OPTIONS)
    assert (summary.done, summary.failed, summary.skipped) == (3, 0, 0)
    rows = read_rows(out)
    assert [r["id"] for r in rows] == ["000000039769.png", "nested/img000.png", "waterview.jpg"]
    assert pq.read_table(out).column_names[:8] == [
        "id", "image", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error",
    ]  # fmt: skip
    for row in rows:
        expected = vlm.chat(fastvlm.api.image_message(photos / row["id"], PROMPT), max_new_tokens=6)
        assert row["text"] == vlm.ask(str(photos / row["id"]), PROMPT, max_new_tokens=6)
        assert row["text"] == expected.text and row["error"] is None
        assert row["completion_tokens"] == expected.usage.completion_tokens
        assert row["prompt_tokens"] == expected.usage.prompt_tokens
        assert row["finish_reason"] == expected.finish_reason and row["prompt"] == PROMPT


def test_glob_ids_are_relative_to_the_glob_folder(tiny_checkpoint_dir, tmp_path):
    make_images(tmp_path / "a" / "x", 2)
    out = tmp_path / "out.jsonl"
    fastvlm.run_batch([str(tmp_path / "a" / "*" / "*.png")], out, model=str(tiny_checkpoint_dir), **OPTIONS)
    assert [r["id"] for r in read_rows(out)] == ["x/img000.png", "x/img001.png"]


def _table_rows(images: list[Path], folder: Path) -> list[dict]:
    rows = [{"key": f"k{i}", "image": p.name, "question": f"What is {i}?"} for i, p in enumerate(images)]
    rows[1]["question"] = None  # falls back to --prompt
    rows[2]["image"] = str(images[2].resolve())  # absolute path
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tables(vlm, tiny_checkpoint_dir, tmp_path, fmt):
    images = make_images(tmp_path / "data", 3)
    rows = _table_rows(images, tmp_path / "data")
    table = tmp_path / "data" / f"table.{fmt}"
    if fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        lines = ["key,image,question"] + [f"{r['key']},{r['image']},{r['question'] or ''}" for r in rows]
        table.write_text("\n".join(lines) + "\n")
    else:
        # Hugging Face datasets' Image feature: {"bytes", "path"}; the first row holds bytes.
        for r in rows:
            r["image"] = {"bytes": None, "path": r["image"]}
        rows[0]["image"] = {"bytes": images[0].read_bytes(), "path": None}
        pq.write_table(pa.Table.from_pylist(rows), table)
    out = tmp_path / "out.jsonl"
    fastvlm.run_batch(
        [str(table)],
        out,
        model=str(tiny_checkpoint_dir),
        prompt_column="question",
        id_column="key",
        **OPTIONS,
    )
    got = read_rows(out)
    assert [r["id"] for r in got] == ["k0", "k1", "k2"]
    assert [r["prompt"] for r in got] == ["What is 0?", PROMPT, "What is 2?"]
    assert got[0]["image"] == (None if fmt == "parquet" else "img000.png")  # bytes are not echoed
    for row, path in zip(got, images, strict=True):
        assert row["error"] is None
        assert row["text"] == vlm.ask(str(path), row["prompt"], max_new_tokens=6)


def test_table_without_id_column_uses_row_numbers(tiny_checkpoint_dir, tmp_path):
    make_images(tmp_path, 2)
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "img000.png"}\n\n{"image": "img001.png", "prompt": "Name it."}\n')
    fastvlm.run_batch([str(table)], tmp_path / "o.parquet", model=str(tiny_checkpoint_dir), **OPTIONS)
    rows = read_rows(tmp_path / "o.parquet")
    assert [(r["id"], r["prompt"]) for r in rows] == [("0", PROMPT), ("1", "Name it.")]


@pytest.mark.slow
def test_parquet_image_bytes_column(vlm, tiny_checkpoint_dir, tmp_path):
    (path,) = make_images(tmp_path, 1)
    schema = pa.schema([("image", pa.binary()), ("prompt", pa.string())])
    table = pa.Table.from_pylist([{"image": path.read_bytes(), "prompt": "Name it."}], schema)
    pq.write_table(table, tmp_path / "t.parquet")
    fastvlm.run_batch(
        [str(tmp_path / "t.parquet")], tmp_path / "o.jsonl", model=str(tiny_checkpoint_dir), **OPTIONS
    )
    (row,) = read_rows(tmp_path / "o.jsonl")
    assert row["image"] is None and row["text"] == vlm.ask(str(path), "Name it.", max_new_tokens=6)


def test_broken_rows_are_errors_and_the_job_goes_on(tiny_checkpoint_dir, tmp_path, capsys):
    make_images(tmp_path, 1)
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "text.jpg").write_text("hello")
    rows = [
        "img000.png",
        "big.png",
        "broken.png",
        "text.jpg",
        "missing.png",
        "https://example.com/a.png",
        None,
    ]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"image": r}) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    argv = ["batch", str(table), "--output", str(out), "--model", str(tiny_checkpoint_dir), "--device", "cpu"]
    argv += ["--dtype", "float32", "--max-new-tokens", "4", "--max-image-pixels", "20000", "--no-progress"]
    assert main(argv) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 done, 6 failed, 0 skipped" in last and "images/s" in last
    got = {r["id"]: r for r in read_rows(out)}
    assert got["0"]["error"] is None and got["0"]["text"]
    for i in range(1, 7):
        assert got[str(i)]["text"] is None and got[str(i)]["error"], rows[i]
    assert "Mpx" in got["1"]["error"] and "remote" in got["5"]["error"]
    assert "no image file" in got["4"]["error"] and "names no image" in got["6"]["error"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nope"], "no such input"),
        (["{tmp}/empty"], "no images found"),
        (["{tmp}/t.jsonl", "--image-column", "picture"], "no column 'picture'"),
        (["{tmp}/t.jsonl", "--prompt-column", "q"], "no column 'q'"),
        (["{tmp}/t.jsonl", "--output", "{tmp}/o.txt"], "must end in .parquet or .jsonl"),
        (["{tmp}/t.jsonl", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["{tmp}/t.jsonl", "--max-batch", "0"], "max_batch must be an integer >= 1"),
        (["{tmp}/t.jsonl", "{tmp}/t.jsonl"], "appears twice"),
        (["{tmp}/bad.jsonl"], "line 2 is not valid JSON"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "t.jsonl").write_text('{"image": "a.png"}\n')
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{oops\n')
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--output" in args else ["--output", str(tmp_path / "o.jsonl")]
    assert main(["batch", *args, *out, "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_rerun_completes_only_missing_rows(tiny_checkpoint_dir, tmp_path):
    make_images(tmp_path / "in", 3)
    out = tmp_path / "o.parquet"
    fastvlm.run_batch([str(tmp_path / "in")], out, model=str(tiny_checkpoint_dir), **OPTIONS)
    parts = set(out.glob("part-*.parquet"))
    again = fastvlm.run_batch([str(tmp_path / "in")], out, model=str(tiny_checkpoint_dir), **OPTIONS)
    assert (again.done, again.skipped) == (0, 3) and set(out.glob("part-*.parquet")) == parts
    make_images(tmp_path / "in", 2, start=3)
    more = fastvlm.run_batch([str(tmp_path / "in")], out, model=str(tiny_checkpoint_dir), **OPTIONS)
    assert (more.done, more.skipped) == (2, 3)
    assert all(p.stat().st_mtime_ns for p in parts)  # earlier parts are still there, untouched
    assert [r["id"] for r in read_rows(out)] == [f"img{i:03d}.png" for i in range(5)]


@pytest.mark.slow
def test_jsonl_resume_drops_a_torn_last_line(tiny_checkpoint_dir, tmp_path):
    make_images(tmp_path / "in", 2)
    out = tmp_path / "o.jsonl"
    fastvlm.run_batch([str(tmp_path / "in")], out, model=str(tiny_checkpoint_dir), **OPTIONS)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:10])  # a kill in the middle of the second line
    summary = fastvlm.run_batch([str(tmp_path / "in")], out, model=str(tiny_checkpoint_dir), **OPTIONS)
    assert (summary.done, summary.skipped) == (1, 1)
    assert sorted(r["id"] for r in read_rows(out)) == ["img000.png", "img001.png"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_sigkill_then_rerun_gives_every_row_exactly_once(tiny_checkpoint_dir, tmp_path, suffix):
    make_images(tmp_path / "in", 40)
    out = tmp_path / f"o{suffix}"
    cmd = [sys.executable, "-m", "fastvlm", "batch", str(tmp_path / "in"), "--output", str(out)]
    cmd += ["--model", str(tiny_checkpoint_dir), "--device", "cpu", "--dtype", "float32"]
    cmd += ["--max-new-tokens", "24", "--commit-every", "3", "--max-batch", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _rows_written(out) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = _rows_written(out)
    assert 0 < written < 40, "the job should be killed part-way"
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped as already done" in rerun.stderr.splitlines()[-1]
    ids = [r["id"] for r in read_rows(out)]
    assert ids == [f"img{i:03d}.png" for i in range(40)]  # every input exactly once


def _rows_written(out: Path) -> int:
    if out.suffix == ".jsonl":
        return out.read_bytes().count(b"\n") if out.exists() else 0
    return sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) if out.exists() else 0


@pytest.mark.slow
def test_import_fastvlm_does_not_import_ray_or_pyarrow():
    code = (
        "import sys, fastvlm; assert fastvlm.run_batch; print('ray' in sys.modules, 'pyarrow' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
