"""``torchrun`` data parallelism: two CPU processes train exactly like one process.

Two processes with one row each per step see the same global batch as one process
accumulating two rows, so their losses and the saved adapter must agree.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from finetune_helpers import CPU, finetune, losses, write_dataset

ARGS = ["--max-steps", "3", "--lr", "1e-2", "--lora-rank", "4", "--lora-dropout", "0", "--seed", "5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tiny_checkpoint_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_dataset(tmp_path / "data", text_only_every=3)  # some ranks see no image: unused projector
    one = tmp_path / "one"
    assert finetune(tiny_checkpoint_dir, data, one, *ARGS, "--batch-size", "1", "--grad-accum", "2") == 0

    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command = [
        *torchrun,
        "-m",
        "fastvlm",
        "finetune",
        "--model",
        str(tiny_checkpoint_dir),
        "--data",
        str(data),
    ]
    command += ["--output", str(two), *CPU, *ARGS, "--batch-size", "1", "--grad-accum", "1"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
