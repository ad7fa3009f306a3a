"""One folder with every kind of file that phones, scanners and downloads produce, and what should happen to each."""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# relative path -> ("ok", (width, height) after EXIF) or ("skip", a piece of the reason)
Expectation = tuple[str, object]


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 220, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: Pillow's size check must stop it before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def make_bad_input_folder(folder: Path) -> dict[str, Expectation]:
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expectation] = {}

    def put(name: str, data: bytes, expectation: Expectation) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[name] = expectation

    photo = _photo(48, 32)
    good_jpeg = _jpeg_bytes(photo)
    put("empty.jpg", b"", ("skip", "empty file"))
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], ("skip", "truncated"))
    put("text_named.png", b"these are not the pixels you are looking for\n" * 20, ("skip", "cannot identify"))
    webp = io.BytesIO()
    photo.save(webp, format="WEBP")
    put("webp_named.jpg", webp.getvalue(), ("ok", (48, 32)))
    put("cmyk.jpg", _jpeg_bytes(photo.convert("CMYK")), ("ok", (48, 32)))
    sixteen = io.BytesIO()
    Image.fromarray((np.linspace(0, 65535, 48 * 32).reshape(32, 48)).astype(np.uint16)).save(sixteen, format="PNG")
    put("sixteen_bit.png", sixteen.getvalue(), ("ok", (48, 32)))
    for mode, name in (("L", "grayscale.png"), ("P", "palette.png"), ("RGBA", "rgba.png")):
        buffer = io.BytesIO()
        photo.convert(mode).save(buffer, format="PNG")
        put(name, buffer.getvalue(), ("ok", (48, 32)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    put("exif_rotated.jpg", _jpeg_bytes(photo, exif=exif.tobytes()), ("ok", (32, 48)))
    one = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 120, 90)).save(one, format="PNG")
    put("one_pixel.png", one.getvalue(), ("ok", (1, 1)))
    put("bomb.png", _bomb_png(20000, 20000), ("skip", "DecompressionBomb"))
    put("UPPER.JPG", good_jpeg, ("ok", (48, 32)))
    put("Mixed.Png", one.getvalue(), ("ok", (1, 1)))
    put("한국어 이름 with space.jpg", good_jpeg, ("ok", (48, 32)))
    put("nested/deeper/inside.jpeg", good_jpeg, ("ok", (48, 32)))
    # not images at all, or not meant to be seen: never counted
    (folder / ".hidden.jpg").write_bytes(good_jpeg)
    (folder / ".hidden_dir").mkdir(exist_ok=True)
    (folder / ".hidden_dir" / "x.jpg").write_bytes(good_jpeg)
    (folder / "notes.txt").write_text("scanner log")
    loop = folder / "nested" / "loop"
    if not loop.exists():
        os.symlink("..", loop)  # a folder symlink back to its parent: following it would never end
    return expected
