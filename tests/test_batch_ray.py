"""``fastvlm batch --ray``: a local Ray instance and a two-node cluster give local mode's rows.

Everything binds to 127.0.0.1. The two-node test pins one model replica to each node
with a custom resource and checks from the summary that both nodes ran rows.
"""

from __future__ import annotations

import json
import os

import pytest

import fastvlm
from fastvlm.cli import main
from test_batch import make_images, read_rows

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

OPTIONS = {"device": "cpu", "dtype": "float32", "max_new_tokens": 6, "progress": False, "max_batch": 2}


@pytest.fixture(autouse=True)
def _ray_env(monkeypatch):
    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def job(tmp_path, tiny_checkpoint_dir):
    """Inputs (a folder and a table with a broken row) and local mode's output for them."""
    make_images(tmp_path / "in", 7)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    table = tmp_path / "t.jsonl"
    table.write_text(
        "".join(json.dumps({"id": f"t{i}", "image": f"in/img00{i}.png"}) + "\n" for i in range(3))
    )
    inputs = [str(tmp_path / "in"), str(table)]
    local = tmp_path / "local.jsonl"
    fastvlm.run_batch(inputs, local, model=str(tiny_checkpoint_dir), id_column="id", **OPTIONS)
    return inputs, read_rows(local)


def test_cli_ray_local_instance_equals_local_mode(job, tmp_path, tiny_checkpoint_dir, capsys):
    inputs, expected = job
    out = tmp_path / "ray.parquet"
    argv = ["batch", *inputs, "--output", str(out), "--ray", "--id-column", "id", "--no-progress"]
    argv += ["--model", str(tiny_checkpoint_dir), "--device", "cpu", "--dtype", "float32"]
    argv += ["--max-new-tokens", "6", "--max-batch", "2", "--workers", "1"]
    assert main(argv) == 0
    assert "10 done, 1 failed, 0 skipped" in capsys.readouterr().err.strip().splitlines()[-1]
    assert read_rows(out) == expected
    assert not ray.is_initialized()  # the instance it started is gone


def test_two_node_cluster_one_replica_per_node_equals_local_mode(
    job, tmp_path, tiny_checkpoint_dir, monkeypatch
):
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    # ray.init(address="127.0.0.1:PORT") swaps loopback for this machine's outward address
    # (found by routing towards 8.8.8.8), where nothing listens for a loopback-only cluster:
    # the driver then hangs. Ray keeps loopback when it believes clusters are off.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    inputs, expected = job
    node = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "resources": {"fastvlm_replica": 1}}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        out = tmp_path / "ray.parquet"
        summary = fastvlm.run_batch(
            inputs, out, model=str(tiny_checkpoint_dir), id_column="id", ray="auto", workers=2,
            ray_remote_args={"resources": {"fastvlm_replica": 1}}, **OPTIONS,
        )  # fmt: skip
        assert (summary.done, summary.failed) == (10, 1)
        # Every row ran on one of the two nodes. Which node gets how many is Ray's choice:
        # on a loaded machine one replica may finish all 11 rows while the other still loads.
        assert sum(summary.rows_per_node.values()) == 11 and 1 <= len(summary.rows_per_node) <= 2
        assert read_rows(out) == expected
        again = fastvlm.run_batch(
            inputs, out, model=str(tiny_checkpoint_dir), id_column="id", ray="auto", **OPTIONS
        )
        assert (again.done, again.skipped) == (0, 11)
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
