"""Where extraction decodes: the choice (GPU only on CUDA, only JPEGs, only when measured faster
than the loader workers), and the decode_jpeg path itself, run here on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from transferkit.features import decode as decode_module
from transferkit.features import store
from transferkit.features.cache import Extraction, job_key
from transferkit.features.decode import choose_decode, decode_device

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
JPEGS = [Path(f"a/{i}.jpg") for i in range(4)] + [Path("b/x.JPEG")]


@pytest.mark.parametrize(
    ("device", "paths", "workers", "cpu", "gpu", "expected"),
    [
        (CUDA, JPEGS, 8, 150.0, 3000.0, "cuda:0"),  # nvJPEG beats 8 workers at 150/s
        (CUDA, JPEGS, 8, 150.0, 1000.0, "pil"),  # 8 workers decode 1200/s: they win
        (CUDA, JPEGS, 0, 150.0, 200.0, "cuda:0"),  # no workers: one process's rate
        (CPU, JPEGS, 8, 150.0, 3000.0, "pil"),  # no GPU
        (CUDA, [*JPEGS, Path("c/y.png")], 8, 150.0, 3000.0, "pil"),  # not every file a JPEG
        (CUDA, [], 8, 150.0, 3000.0, "pil"),
        (CUDA, JPEGS, 8, None, None, "pil"),  # nothing measured
    ],
)
def test_the_gpu_decodes_only_jpegs_on_cuda_when_it_is_faster(
    device, paths, workers, cpu, gpu, expected
) -> None:
    assert decode_device(device, paths, workers, cpu, gpu) == expected


def test_on_a_cpu_nothing_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "decode_rates", lambda *a: pytest.fail("measured"))
    assert choose_decode(CPU, JPEGS, 4, lambda x: x) == "pil"
    assert choose_decode(CUDA, [Path("x.png")], 4, lambda x: x) == "pil"


def test_the_decode_jpeg_path_gives_pil_s_features_under_its_own_key(tmp_path: Path) -> None:
    """6 JPEGs through decode_jpeg (on the CPU here) and through PIL: the same features to JPEG
    decoders' rounding, and the choice is in the key (the bytes may differ)."""
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        pixels = (torch.rand(24, 24, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(path, quality=90)
        items.append((path, i % 2))
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    features = {}
    for decode in ("pil", "cpu"):
        job = Extraction(
            backbone, {"val": items}, transform, transform, views=1, dtype=torch.float32,
            device=CPU, seed=0, batch_size=4, num_workers=0, decode=decode,
        )  # fmt: skip
        (tmp_path / decode).mkdir()
        job.write_shards(tmp_path / decode)
        features[decode] = (
            torch.from_numpy(store.open_array(store.features_file(tmp_path / decode, "val"))),
            job,
        )
    torch.testing.assert_close(features["cpu"][0], features["pil"][0], atol=2e-2, rtol=0)
    assert job_key(features["cpu"][1]) != job_key(features["pil"][1])


def photo(path: Path, orientation: int) -> Path:
    """A 48 x 32 JPEG (wider than tall, so a transposition shows in the shape) whose pixels say
    where they are (red grows rightwards, green downwards), tagged with EXIF `orientation`."""
    x = torch.linspace(0, 255, 48).expand(32, 48)
    y = torch.linspace(0, 255, 32)[:, None].expand(32, 48)
    pixels = torch.stack([x, y, torch.full_like(x, 96)], dim=-1).round().byte().numpy()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_decode_jpeg_path_turns_photos_upright_as_pil_does(tmp_path: Path, orientation: int) -> None:
    """A phone photo's EXIF orientation (6: rotated 90 degrees, 3: upside down, ...) is applied
    on the decode_jpeg path as load_rgb applies it (ImageOps.exif_transpose): the same shape, and
    the same pixels to within 3 levels of 255 (two JPEG decoders' rounding; a wrong turn is off
    by over 100)."""
    from torchvision.transforms import v2

    from transferkit.data.images import load_rgb
    from transferkit.features.decode import EncodedImages, decode_batch, encoded_batch

    path = photo(tmp_path / f"{orientation}.jpg", orientation)
    transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    expected = transform(load_rgb(path))
    data, labels = encoded_batch([EncodedImages([(path, 7)])[0]])
    decoded = decode_batch(data, transform, "cpu")
    assert expected.shape == ((3, 48, 32) if orientation >= 5 else (3, 32, 48))
    assert decoded.shape == (1, *expected.shape) and labels == [7]
    torch.testing.assert_close(decoded[0], expected, atol=3 / 255, rtol=0)
