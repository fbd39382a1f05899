"""Ray mode: the same job as a Ray Data pipeline, on one machine or a cluster.

    rows (listed by the driver) -> map_batches(decode, tasks) -> map_batches(Predictor,
    an actor pool of ``workers`` model replicas) -> the driver commits part files

The driver lists the rows (names and prompts, not pixels), so ids and the resume filter
are exactly those of local mode; the decoding, the model and the reading of image files
run on the cluster's nodes, which must see the same paths (shared storage) when the job
spans machines. Result rows are small (text), so they stream back to the driver, which
writes them with the same atomic part files as local mode: no shared output storage is
needed and a killed job resumes the same way. Ray and pyarrow are imported here only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import InputError
from .inputs import Row
from .options import BatchOptions, image_load_options, load_model
from .stages import EngineDriver, Prepared, preprocess

_DECODE_BATCH = 4  # rows per decode task: decoded RGB (up to ~3 MB per 1024 px image) travels in blocks
_CPU_PER_DECODE = 0.25  # fractional, so decode tasks still run beside CPU model replicas


def run_ray(
    opts: BatchOptions, rows: Iterator[Row], emit: Callable[[dict], None], rows_per_node: dict[str, int]
) -> None:
    """Run ``rows`` on Ray; ``emit`` gets each result row on the driver as it arrives."""
    import ray

    started_here = _connect(opts.ray)
    try:
        ds = _pipeline(opts, rows)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                node = row.pop("node")
                rows_per_node[node] = rows_per_node.get(node, 0) + 1
                emit(row)
    finally:
        if started_here:
            ray.shutdown()


def require_ray() -> None:
    """InputError (one line) when Ray Data is not installed."""
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise InputError(f"--ray needs Ray Data ({exc}); install it: pip install 'fastvlm[ray]'") from None


def _connect(address: str) -> bool:
    """Join ``address`` ("auto" or host:port) or start a private instance ("local").

    Returns whether Ray was started here (and must be shut down). A Ray already
    initialised in this process (a notebook, a test) is used as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        # A private instance serves this machine only: bind it to loopback.
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        return True
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise InputError(
            f"cannot join the Ray cluster at {address!r} ({reason}); start one with 'ray start --head', "
            "or pass --ray alone to start Ray on this machine"
        ) from None
    return True


def _pipeline(opts: BatchOptions, rows: Iterator[Row]):
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from ..processing import FastVLMProcessor

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the job shows its own progress
    context = DataContext.get_current()
    context.enable_progress_bars = False  # the job shows its own bar, with images/s and ETA
    processor = FastVLMProcessor.from_pretrained(opts.model)  # tokenizer and settings only
    decode_args = (opts.prompt, image_load_options(processor, opts), processor.settings.rgb_rules)
    # A block goes whole to one replica, so blocks of one model batch spread rows over replicas.
    rows_per_block = 2 * opts.max_batch  # enough to refill the engine's batch as rows finish
    ds = ray.data.from_arrow(list(_blocks(rows, rows_per_block)))
    ds = ds.map_batches(
        _decode_batch, fn_args=decode_args, batch_size=_DECODE_BATCH, batch_format="pyarrow",
        num_cpus=_CPU_PER_DECODE,
    )  # fmt: skip
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    placement = {"num_gpus": 1} if gpus else {"num_cpus": _cpus_per_replica(opts.workers)}
    return ds.map_batches(
        Predictor,
        fn_constructor_args=(opts, gpus),
        batch_size=rows_per_block,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=opts.workers, max_tasks_in_flight_per_actor=2),
        **{**placement, **opts.ray_remote_args},
    )


def _cpus_per_replica(workers: int) -> float:
    """A CPU replica's share: most of the cluster, leaving room for the decode tasks."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(0.5, round(cpus * 0.75 / workers, 2))


def _blocks(rows: Iterator[Row], size: int) -> Iterator[Any]:
    """The listed rows as Arrow tables of ``size`` rows."""
    import pyarrow as pa

    schema = pa.schema(
        [("id", pa.string()), ("image", pa.string()), ("path", pa.string()), ("data", pa.binary()),
         ("prompt", pa.string())]
    )  # fmt: skip
    chunk: list[dict] = []
    for row in rows:
        source = row.source
        path, data = (source, None) if isinstance(source, str) or source is None else (None, source)
        chunk.append({"id": row.id, "image": row.image, "path": path, "data": data, "prompt": row.prompt})
        if len(chunk) == size:
            yield pa.Table.from_pylist(chunk, schema=schema)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=schema)


def _decode_batch(batch, default_prompt: str, load_options, rules):
    """Decode stage (Ray tasks): rows -> raw RGB pixels and size, or an error."""
    import pyarrow as pa

    out = []
    for r in batch.to_pylist():
        source = r["path"] if r["data"] is None else r["data"]
        item = preprocess(Row(r["id"], r["image"], source, r["prompt"]), default_prompt, load_options, rules)
        size = item.rgb.size if item.rgb is not None else (0, 0)
        out.append(
            {"id": item.id, "image": item.image, "prompt": item.prompt, "error": item.error,
             "rgb": item.rgb.tobytes() if item.rgb is not None else None, "width": size[0], "height": size[1]}
        )  # fmt: skip
    return pa.Table.from_pylist(out, schema=_decoded_schema())


def _decoded_schema():
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("image", pa.string()), ("prompt", pa.string()), ("error", pa.string()),
         ("rgb", pa.large_binary()), ("width", pa.int32()), ("height", pa.int32())]
    )  # fmt: skip


class Predictor:
    """One model replica (a Ray actor): loads the model once, then runs batches of rows."""

    def __init__(self, opts: BatchOptions, gpus: bool) -> None:
        import ray

        self.opts = opts
        self.vlm = load_model(opts, device="cuda" if gpus else None)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        import pyarrow as pa
        from PIL import Image

        from .output import arrow_schema

        items = []
        for r in batch.to_pylist():
            rgb = None if r["rgb"] is None else Image.frombytes("RGB", (r["width"], r["height"]), r["rgb"])
            items.append(Prepared(r["id"], r["image"], r["prompt"], rgb=rgb, error=r["error"]))
        driver = EngineDriver(self.vlm.engine, self.opts.generation)
        rows = driver.run(items)
        schema = arrow_schema(driver.extraction.arrow_types()).append(pa.field("node", pa.string()))
        return pa.Table.from_pylist([{**r, "node": self.node} for r in rows], schema=schema)
