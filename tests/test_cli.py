"""The ``fastvlm`` command end to end (subprocesses) and its error paths."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

import builders
from fastvlm import cli

IMAGE = str(builders.shared_assets() / "images" / "waterview.jpg")
CPU = ["--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir) -> str:
    return str(tiny_checkpoint_dir)


def fastvlm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fastvlm", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.slow
def test_run_streams_and_json_agrees(tiny):
    streamed = fastvlm("run", IMAGE, "What is this?", "--model", tiny, "--max-new-tokens", "5", *CPU)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.endswith("\n") and streamed.stdout.strip()
    as_json = fastvlm("run", IMAGE, "What is this?", "--model", tiny, "--max-new-tokens", "5", *CPU, "--json")
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert {"text", "finish_reason", "usage", "timings"} <= set(out)
    assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 5
    assert out["text"] == streamed.stdout[:-1]


@pytest.mark.slow
def test_chat_reads_turns_and_commands_from_stdin(tiny):
    turns = f"Hello!\n/image {IMAGE}\nWhat is in it?\n/reset\n\nAgain.\n/exit\nnot read\n"
    proc = fastvlm("chat", "--model", tiny, "--max-new-tokens", "3", *CPU, stdin=turns)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3  # one answer per question; commands print nothing


@pytest.mark.slow
def test_chat_takes_several_images_in_several_turns(tiny, monkeypatch, capsys):
    cat, receipt = (
        str(builders.shared_assets() / "images" / n) for n in ("000000039769.png", "ocr_example3.jpg")
    )
    turns = f"Compare.\n/image {receipt}\n/image {cat}\nAnd these?\nNo image.\n/image /no/such.png\n"
    turns += f"/image {cat}\n/image none\nDropped.\n/reset\nAgain.\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    asked = []
    real_answer = cli._answer
    monkeypatch.setattr(
        cli, "_answer", lambda vlm, request: asked.append(request) or real_answer(vlm, request)
    )
    args = ["chat", IMAGE, "--image", cat, "--model", tiny, "--max-new-tokens", "2", *CPU]
    assert cli.main(args) == 0
    images = [[p["image"] for p in r.messages[-1]["content"] if p["type"] == "image"] for r in asked]
    assert images == [[IMAGE, cat], [receipt, cat], [], [], [IMAGE, cat]]
    parts = [p for m in asked[2].messages if isinstance(m["content"], list) for p in m["content"]]
    assert sum(p["type"] == "image" for p in parts) == 4  # earlier turns keep their images
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "such.png" in err


@pytest.mark.slow
def test_info_reads_headers_only(tiny, capsys):
    proc = fastvlm("info", tiny, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == "fast_vlm"
    assert info["vision"]["image_size"] == [128, 128] and info["vision"]["num_image_tokens"] == 4
    assert info["text"]["hidden_size"] == 64 and info["text"]["vocab_size"] == 152000
    assert info["weights"]["dtype"] == "float32" and info["weights"]["parameters"] > 152000 * 64
    assert cli.main(["info", tiny]) == 0
    assert "fast_vlm" in capsys.readouterr().out


@pytest.mark.slow
def test_error_paths_are_one_line(tiny, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("just text")
    cases = [
        (["run", str(tmp_path / "missing.jpg"), "Hi", "--model", tiny], ["missing.jpg"]),
        (["run", str(not_image), "Hi", "--model", tiny], ["cannot decode"]),
        (["run", IMAGE, "Hi", "--model", tiny, "--bogus"], ["--bogus", "fastvlm run --help"]),
    ]
    for args, needles in cases:
        assert_one_line_error(fastvlm(*args), *needles)


def test_more_error_paths_in_process(tiny, tmp_path, capsys):
    cases = [
        (["run", IMAGE, "Hi", "--model", str(tmp_path)], ["config.json"]),
        (["run", "none", "Hi", "--model", tiny, "--max-new-tokens", "100000", *CPU], ["context"]),
        (["run", IMAGE, "Hi", "--model", tiny, "--temperature", "-1"], ["temperature"]),
        (["info", str(tmp_path / "nothing")], ["nothing"]),
        (["frobnicate"], ["frobnicate"]),
        (["run", IMAGE, "Hi", "--model", tiny, "--int8", "--int4"], ["--int4", "--int8"]),
        ([], ["COMMAND"]),
    ]
    for args, needles in cases:
        status = cli.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith("error: "), (args, err)
        assert all(n in err[0] for n in needles), (args, err)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["--int8", "--int4"])
def test_quantized_weights_run(tiny, capsys, weights):
    args = ["run", "none", "Hi", "--model", tiny, weights, "--dtype", "bfloat16", "--device", "cpu"]
    assert cli.main([*args, "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_default_model_offline_says_how_to_use_a_local_copy(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "fastvlm", "run", IMAGE, "Hi"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert_one_line_error(proc, "--model /path/to/local/checkpoint")


def test_missing_delegated_command_fails_alone(monkeypatch, capsys):
    monkeypatch.setitem(cli._DELEGATED, "serve", ("fastvlm.no_such_module", "serve"))
    assert cli.main(["serve", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "serve" in err[0] and "unavailable" in err[0]
    with pytest.raises(SystemExit) as info:  # the other commands are unaffected
        cli.main(["run", "--help"])
    assert info.value.code == 0


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert cli.main(["info", "anything"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_info_on_a_hub_id_fetches_headers_not_weights(tiny, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path
    from types import SimpleNamespace

    import huggingface_hub

    from fastvlm.api import describe_checkpoint
    from fastvlm.checkpoints.safetensors_io import SafetensorsReader
    from fastvlm.errors import CheckpointError

    asked = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked["patterns"] = allow_patterns
        for path in Path(tiny).iterdir():
            if path.suffix != ".safetensors":
                shutil.copy(path, tmp_path)
        return str(tmp_path)

    def get_safetensors_metadata(repo_id, revision=None):
        files = {}
        for path in Path(tiny).glob("*.safetensors"):
            entries = SafetensorsReader(path).entries
            tensors = {
                name: SimpleNamespace(dtype=e["dtype"], shape=e["shape"], data_offsets=e["data_offsets"])
                for name, e in entries.items()
            }
            files[path.name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    remote, local = describe_checkpoint("someone/tiny-fastvlm"), describe_checkpoint(tiny)
    assert "*.safetensors" not in asked["patterns"] and "*.json" in asked["patterns"]
    assert remote["weights"]["parameters_by_dtype"] == local["weights"]["parameters_by_dtype"]
    assert remote["text"] == local["text"] and remote["vision"] == local["vision"]

    def offline(repo_id, revision=None):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", offline)
    with pytest.raises(CheckpointError, match="could not read the weight headers of 'someone/tiny-fastvlm'"):
        describe_checkpoint("someone/tiny-fastvlm")


@pytest.mark.parametrize(
    "command, missing, extra",
    [
        ("serve", "fastapi", "server"),
        ("bench", "transformers", "bench"),
        ("batch", "ray", "ray"),
        ("finetune", "peft", "train"),
        ("serve", "pydantic_core", "server"),  # not ours to name: the command's own extra
    ],
)
def test_missing_dependency_names_the_extra_that_installs_it(monkeypatch, capsys, command, missing, extra):
    import importlib

    def import_module(name):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(importlib, "import_module", import_module)
    assert cli.main([command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"; install fastvlm[{extra}]"), err


def test_a_broken_delegated_module_names_no_extra(monkeypatch, capsys):
    import importlib

    def import_module(name):
        raise SyntaxError("invalid syntax")

    monkeypatch.setattr(importlib, "import_module", import_module)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "SyntaxError" in err and "install" not in err
