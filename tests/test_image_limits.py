"""Image limits below the server: the same size, shape, pixel and address checks for the
library, the CLI and the server, and preprocessing whose work is bounded by its output.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvlm.errors import InputError
from fastvlm.processing import image_transforms
from fastvlm.processing.image_source import ImageLoadOptions, ImageSourceError
from fastvlm.processing.image_transforms import ImageSettings, expand_to_square, preprocess_image
from fastvlm.processing.images import HF_RGB_RULES, load_rgb_image


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def full_resize(image: Image.Image, settings: ImageSettings, monkeypatch) -> torch.Tensor:
    """The reference path: resize the whole image, then crop (affordable for small inputs)."""
    with monkeypatch.context() as patch:
        patch.setattr(image_transforms, "MAX_RESIZE_FACTOR", 10**12)
        patch.setattr(image_transforms, "MAX_SQUARE_SIDE", 10**6)
        return preprocess_image(image, settings)


# ---- preprocessing bounded by the output ------------------------------------------------


@pytest.mark.parametrize("size", [(4, 80), (80, 4), (40, 1000), (17, 300), (2, 60)])
@pytest.mark.parametrize("backend, levels", [("torch", 2), ("pil", 1)])
@pytest.mark.parametrize("resample", [3, 0])
def test_elongated_images_resample_only_the_kept_window(size, backend, levels, resample, monkeypatch):
    image, settings = random_image(*size), ImageSettings(resize_backend=backend, resample=resample)
    got, want = preprocess_image(image, settings), full_resize(image, settings, monkeypatch)
    assert got.shape == want.shape == (3, 1024, 1024)
    # Pillow's box keeps every output pixel's source position; what differs is rounding
    # (and, for the torch backend, Pillow's kernel instead of torch's: at most 2 levels).
    assert (got - want).abs().max().item() * 255 <= levels + 1e-4
    assert (got != want).float().mean().item() < 0.01


@pytest.mark.parametrize("size", [(640, 480), (1000, 200), (4000, 250), (250, 4000), (30, 30)])
def test_ordinary_shapes_take_the_reference_path(size, monkeypatch):
    def refuse(*args):
        raise AssertionError("the window path was taken")

    monkeypatch.setattr(image_transforms, "_resize_window", refuse)
    image = random_image(*size)
    for settings in (ImageSettings(), ImageSettings(resize_backend="pil"), ImageSettings(pad_to_square=True)):
        assert preprocess_image(image, settings).shape == (3, 1024, 1024)


def test_pad_to_square_below_the_bound_is_unchanged(monkeypatch):
    image, settings = random_image(300, 40), ImageSettings(pad_to_square=True)
    square = expand_to_square(image, (0, 0, 0))
    assert torch.equal(preprocess_image(image, settings), preprocess_image(square, ImageSettings()))


def test_pad_to_square_shrinks_huge_sides_first():
    image = Image.new("RGB", (1, 5000), (255, 255, 255))
    out = preprocess_image(image, ImageSettings(pad_to_square=True))
    assert out.shape == (3, 1024, 1024)
    # The white line stays in the middle column, over black padding.
    column = out[0, 512].nonzero().flatten().tolist()
    assert column and all(500 <= c <= 524 for c in column)


def test_without_a_crop_elongated_images_are_refused():
    settings = ImageSettings(crop_size=None)
    assert preprocess_image(random_image(100, 300), settings).shape == (3, 3072, 1024)
    with pytest.raises(InputError, match="too elongated"):
        preprocess_image(random_image(1, 300), settings)


_MEASURE = """
import io, sys
from PIL import Image
from fastvlm.processing.image_source import ImageLoadOptions
from fastvlm.processing.image_transforms import ImageSettings, preprocess_image
from fastvlm.processing.images import HF_RGB_RULES, load_rgb_image

def peak_mb():
    status = open("/proc/self/status").read().splitlines()
    return int(next(l for l in status if l.startswith("VmHWM")).split()[1]) / 1024

pngs = []
for size in [(1, 5000), (5000, 1), (1, 300), (1, 65535), (65535, 1)]:
    buffer = io.BytesIO()
    Image.new("1", size, 1).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
preprocess_image(Image.new("RGB", (64, 64)), ImageSettings())  # load torch's kernels first
base = peak_mb()
for data in pngs:
    for pad in (False, True):
        image = load_rgb_image(data, ImageLoadOptions(), HF_RGB_RULES, "x")
        assert preprocess_image(image, ImageSettings(pad_to_square=pad)).shape == (3, 1024, 1024)
print(peak_mb() - base)
"""


@pytest.mark.slow
def test_peak_memory_of_thin_images_is_bounded():
    import fastvlm

    env = {**os.environ, "PYTHONPATH": str(Path(fastvlm.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    growth_mb = float(out.stdout.strip())
    print(f"\npeak RSS growth, thin images with and without pad-to-square: {growth_mb:.0f} MB")
    assert growth_mb < 400  # the 4096^2 square and its tensor copies; 1x5000 alone once took 22 GB


# ---- one set of limits for every source -------------------------------------------------


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_side_longer_than_65535_is_refused_for_every_source():
    options = ImageLoadOptions()
    with pytest.raises(ImageSourceError, match="longer than 65535 pixels") as info:
        load_rgb_image(png(1, 70_000), options, HF_RGB_RULES, "message 0, part 0")
    assert info.value.code == "image_too_large" and str(info.value).startswith("message 0, part 0: ")
    with pytest.raises(InputError, match="longer than 65535 pixels"):
        load_rgb_image(Image.new("L", (70_000, 1)), options, HF_RGB_RULES, "x")


class _Host(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def local_host(routes: dict):
    _Host.routes = routes
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_library_fetches_private_hosts_only_when_asked():
    data = png(16, 8)
    with local_host({"/cat.png": (200, {}, data)}) as base:
        url = f"{base}/cat.png"
        with pytest.raises(ImageSourceError, match="not a public internet host") as info:
            load_rgb_image(url, ImageLoadOptions(), HF_RGB_RULES, "image")
        assert info.value.code == "image_host_forbidden"
        allowed = ImageLoadOptions(allow_private_hosts=True)
        assert load_rgb_image(url, allowed, HF_RGB_RULES, "image").size == (16, 8)

        async def inside_a_running_loop() -> Image.Image:
            return load_rgb_image(url, allowed, HF_RGB_RULES, "image")

        assert asyncio.run(inside_a_running_loop()).size == (16, 8)
        with pytest.raises(InputError, match="remote images is disabled"):
            load_rgb_image(url, ImageLoadOptions(allow_remote=False), HF_RGB_RULES, "image")


def test_library_fetch_limits_match_the_servers():
    big = png(16, 8) + bytes(4096)
    redirects = {
        "/big.png": (200, {}, big),
        "/to-data": (302, {"Location": "data:image/png;base64,AAAA"}, b""),
        "/to-mailto": (302, {"Location": "mailto:a@example.com"}, b""),
        "/missing": (404, {}, b""),
    }
    allowed = ImageLoadOptions(allow_private_hosts=True, max_bytes=1024)
    with local_host(redirects) as base:
        for path, pattern in [
            ("/big.png", "larger than"),
            ("/to-data", "redirect|scheme"),
            ("/to-mailto", "redirect|scheme"),
            ("/missing", "HTTP 404"),
        ]:
            with pytest.raises(ImageSourceError, match=pattern):
                load_rgb_image(f"{base}{path}", allowed, HF_RGB_RULES, "image")


def test_processor_option_reaches_the_loader(tiny_checkpoint_dir):
    from fastvlm.processing import FastVLMProcessor

    default = FastVLMProcessor.from_pretrained(tiny_checkpoint_dir)
    opened = FastVLMProcessor.from_pretrained(tiny_checkpoint_dir, allow_private_image_hosts=True)
    assert not default.image_options.allow_private_hosts and opened.image_options.allow_private_hosts


@pytest.mark.parametrize(
    "url",
    ["data:image/png,%ZZ\ud800", "data:image/png;base64,\ud800", "https://xn--/", "http://xn--a/",
     "http://\u00e9.com\ud800/", "http:///x", "http://[::1", "http://256.1.1.1/", "ftp://example.com/x.png",
     "http://user:pw@example.com/x.png", "data:,", "data:text/plain;base64,aGk="],
)  # fmt: skip
def test_malformed_urls_are_input_errors(url):
    # Each fails with one line, before any name is resolved or any connection is made.
    with pytest.raises(InputError, match="^image: "):
        load_rgb_image(url, ImageLoadOptions(), HF_RGB_RULES, "image")
