"""``ptylive export``: images of a result file as OME-TIFF, PNG or NumPy ``.npy``.

What is exported (``--what``), every image float32 on the reconstruction grid (``pixel_size_A``)::

    phase       (H, W)       projected phase Σ_s angle(O_s), rad
    slices      (S, H, W)    phase of each slice, angle(O_s) in (-π, π], rad
    amplitude   (S, H, W)    |O_s| of each slice (transmission, 1 = vacuum)
    probe       (2K, N, N)   |P_k| then angle(P_k) (rad) of each of the K probe modes

The projected phase is the plain sum of each slice's angle, as the viewer's preview and the quality scores
compute it (:func:`ptylive.gpu.quality.projected_phase`). Each slice's angle is fixed only modulo 2π, so
where a slice's phase passes π the sum jumps by 2π; :func:`ptylive.gpu.quality.modulo_two_pi_towards`
removes such jumps only against a known truth, which a result file does not have.

Formats: ``tiff`` writes one OME-TIFF (``tifffile``, the ``[export]`` extra) with axes ``YX``, ``ZYX`` or
``CYX``, ``PhysicalSizeX/Y`` (and ``PhysicalSizeZ``, the slice thickness) in Å and the TIFF resolution in
pixels per centimetre; ``npy`` the array as it is; ``png`` one 16-bit greyscale PNG per plane (``OUT`` for
one plane, ``STEM_000.png``, ``STEM_001.png`` … for a stack) mapped linearly from its finite minimum to its
maximum, which the PNG's text chunks ``ptylive:low`` and ``ptylive:high`` hold with the unit and pixel size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, PngImagePlugin

from ptylive.daemon.service.result_file import open_result
from ptylive.gpu.quality import projected_phase

logger = logging.getLogger(__name__)

WHAT = ("phase", "slices", "amplitude", "probe")
FORMATS = ("tiff", "png", "npy")
SUFFIXES = {".tif": "tiff", ".tiff": "tiff", ".png": "png", ".npy": "npy"}
PNG_LEVELS = 65535
ANGSTROM_PER_CM = 1e8


@dataclass(frozen=True)
class ExportImage:
    """An image to write: ``planes`` (H, W) or (P, H, W) float32, its OME axes, unit and plane names."""

    planes: npt.NDArray[np.float32]
    axes: str
    unit: str
    pixel_size_A: float | None
    slice_thickness_A: float | None = None
    channel_names: tuple[str, ...] = ()


def read_image(path: Path, what: str) -> ExportImage:
    """The image ``what`` (:data:`WHAT`) of the result file at ``path``."""
    if what not in WHAT:
        raise ValueError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    with open_result(path) as f:
        pixel = f.attrs.get("pixel_size_A")
        pixel_A = float(pixel) if pixel is not None else None
        if what == "probe":
            probe = f["probe"][...]
            modes = probe.reshape(-1, *probe.shape[-2:])
            planes = np.stack([part for mode in modes for part in (np.abs(mode), np.angle(mode))])
            names = tuple(f"{part} {k}" for k in range(len(modes)) for part in ("amplitude", "phase (rad)"))
            return ExportImage(planes.astype(np.float32), "CYX", "amplitude, rad", pixel_A, channel_names=names)
        volume = f["object"][...]
        thickness = f.attrs.get("slice_thickness_A")
        thickness_A = float(thickness) if thickness is not None and float(thickness) > 0 else None
    if what == "phase":
        return ExportImage(projected_phase(volume).astype(np.float32), "YX", "rad", pixel_A)
    if what == "slices":
        return ExportImage(np.angle(volume).astype(np.float32), "ZYX", "rad", pixel_A, thickness_A)
    return ExportImage(np.abs(volume).astype(np.float32), "ZYX", "transmission", pixel_A, thickness_A)


def export_format(out: Path, requested: str | None) -> str:
    """``requested``, else the format named by ``out``'s suffix (:data:`SUFFIXES`)."""
    if requested is not None:
        return requested
    found = SUFFIXES.get(out.suffix.lower())
    if found is None:
        raise ValueError(f"cannot tell the format from {out.name!r}: give --format tiff, png or npy "
                         f"(or name the file {', '.join(SUFFIXES)})")
    return found


def _tifffile() -> Any:
    try:
        import tifffile
    except ImportError:
        raise ValueError("TIFF export needs the tifffile package: pip install 'ptylive[export]'") from None
    return tifffile


def write_tiff(image: ExportImage, out: Path) -> list[Path]:
    """One OME-TIFF: axes, physical sizes in Å, channel names; TIFF resolution in pixels per cm."""
    tifffile = _tifffile()
    metadata: dict[str, Any] = {"axes": image.axes, "Name": image.unit}
    options: dict[str, Any] = {}
    if image.pixel_size_A:
        metadata.update(PhysicalSizeX=image.pixel_size_A, PhysicalSizeXUnit="Å",
                        PhysicalSizeY=image.pixel_size_A, PhysicalSizeYUnit="Å")
        per_cm = ANGSTROM_PER_CM / image.pixel_size_A
        options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    if image.slice_thickness_A and "Z" in image.axes:
        metadata.update(PhysicalSizeZ=image.slice_thickness_A, PhysicalSizeZUnit="Å")
    if image.channel_names:
        metadata["Channel"] = {"Name": list(image.channel_names)}
    tifffile.imwrite(out, image.planes, ome=True, photometric="minisblack", metadata=metadata, **options)
    return [out]


def write_npy(image: ExportImage, out: Path) -> list[Path]:
    """The array as it is, at exactly ``out`` (``np.save`` would add ``.npy`` to another name)."""
    with out.open("wb") as handle:
        np.save(handle, image.planes)
    return [out]


def png_plane(plane: npt.NDArray[np.float32], out: Path, info: dict[str, str]) -> None:
    """One 16-bit greyscale PNG, ``plane`` mapped linearly from its finite min to max (NaN black)."""
    finite = plane[np.isfinite(plane)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    span = high - low
    scaled = np.zeros(plane.shape, np.float64) if span == 0 else (np.nan_to_num(plane, nan=low) - low) / span
    levels = np.rint(np.clip(scaled, 0.0, 1.0) * PNG_LEVELS).astype(np.uint16)
    text = PngImagePlugin.PngInfo()
    for key, value in {**info, "low": repr(low), "high": repr(high)}.items():
        text.add_text(f"ptylive:{key}", value)
    Image.fromarray(levels).save(out, format="PNG", pnginfo=text)


def write_png(image: ExportImage, out: Path) -> list[Path]:
    """``out`` for one plane; ``STEM_000.png`` … beside it for a stack."""
    info = {"unit": image.unit, "pixel_size_A": repr(image.pixel_size_A)}
    if image.planes.ndim == 2:
        png_plane(image.planes, out, info)
        return [out]
    paths = []
    for index, plane in enumerate(image.planes):
        name = image.channel_names[index] if image.channel_names else f"slice {index}"
        path = out.with_name(f"{out.stem}_{index:03d}{out.suffix or '.png'}")
        png_plane(plane, path, {**info, "plane": name})
        paths.append(path)
    return paths


WRITERS = {"tiff": write_tiff, "png": write_png, "npy": write_npy}


def export(result: Path, what: str, out: Path, fmt: str | None) -> list[Path]:
    """Write ``what`` of ``result`` to ``out`` in ``fmt`` (default: from the suffix); returns the files written."""
    chosen = export_format(out, fmt)
    if chosen == "tiff":
        _tifffile()  # the missing extra is said before the file is read
    image = read_image(result, what)
    paths = WRITERS[chosen](image, out)
    logger.info("exported %s of %s to %s", what, result, ", ".join(map(str, paths)))
    return paths
