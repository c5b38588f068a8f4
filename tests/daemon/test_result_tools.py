"""``ptylive inspect``, ``export`` and ``plot`` on real result files.

One offline result per module, written by the real ``ptylive reconstruct`` of a tiny simulated scan; one streamed
series' file written by the daemon's own writer (:func:`write_final`) from two workers' finals, one of which
received only some of its frames.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
from PIL import Image

from ptylive.daemon.cli.main import main as cli_main
from ptylive.daemon.engine.geometry import series_geometry
from ptylive.daemon.service.checkpoints import RECOVERED
from ptylive.daemon.service.results import write_final
from ptylive.daemon.service.resume import ResumePlan
from ptylive.daemon.service.supervisor import Rank0
from ptylive.daemon.worker import refine
from ptylive.streaming.scan_plan import ScanPlan, ScanRequest, simplon_v1_count
from tests.conftest import run_cli
from tests.daemon.test_final_writes import START, final_job

ITERATIONS = 3


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ptylive reconstruct`` of a 6 × 5 scan, 2 slices, 16-px window, 3 iterations (about 2 s)."""
    folder = tmp_path_factory.mktemp("result_tools")
    scan, out = folder / "scan.h5", folder / "result.h5"
    assert cli_main(["simulate", str(scan), "--detector-px", "16", "--detector-pixel-mrad", "3.0", "--slices", "2",
                     "--scan", "6", "5", "--step-px", "2"]) == 0
    done = run_cli("reconstruct", str(scan), "--iterations", str(ITERATIONS), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A streamed series' file: 2 workers, 12 of 16 frames received (worker 1 got 4 of its 8)."""
    geometry = series_geometry(START, 2, 1)
    job = final_job(geometry, "stream-7")
    job.finals[1].header["received"] = job.finals[1].header["received"][:4]
    job.finals[0].header["stats"] = {"compute_s": 1.5, "exchange_wait_s": 0.25}
    job.finals[1].header["stats"] = {"compute_s": 2.0, "exchange_wait_s": 0.5}
    return write_final(tmp_path_factory.mktemp("streamed"), job.start, geometry, job.finals, {})


def contents(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {"object": f["object"][...], "probe": f["probe"][...], "loss": f["loss"][...],
                "positions_px": f["positions_px"][...], "attrs": dict(f.attrs),
                "ranks": {name: f["ranks"][name][...] for name in f["ranks"]}}


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli_main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- inspect -----------------------------------------------------------------------------------------------------


def test_inspect_prints_the_run(result: Path) -> None:
    data = contents(result)
    done = run_cli("inspect", str(result))
    assert done.returncode == 0, done.stderr
    lines = {line.split(None, 1)[0]: line for line in done.stdout.splitlines() if line.strip()}
    assert "complete" in lines["status"]
    assert lines["source"].endswith("scan.h5")
    assert "sync, 1 rank" in lines["mode"]
    assert "30 of 30 received" in lines["frames"]
    assert lines["iterations"].split()[1] == str(ITERATIONS)
    assert f"{data['loss'][0]:.4e} -> {data['loss'][-1]:.4e} (amplitude)" in lines["loss"]
    assert "2 × 1.9525 Å" in lines["slices"]
    assert f"{data['attrs']['pixel_size_A']:.6g} Å" in lines["pixel"]
    assert "frames 100.0 %" in lines["coverage"]
    table = done.stdout.split("timings\n", 1)[1].splitlines()
    assert table[0].split()[:3] == ["rank", "compute", "s"] and "peak memory" in table[0]
    assert table[1].split()[0] == "0" and f"{data['ranks']['compute_s'][0]:.3f}" in table[1]
    assert len(table) == 2


def test_inspect_json_holds_the_files_values(result: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, summary = contents(result), inspect_json(result, capsys)
    assert summary["kind"] == "offline" and summary["status"] == "complete" and summary["series_id"] is None
    assert summary["mode"] == "sync" and summary["ranks"] == 1
    assert summary["frames_received"] == summary["frames_expected"] == len(data["positions_px"]) == 30
    assert summary["iterations"] == ITERATIONS == len(data["loss"])
    assert summary["loss_first"] == data["loss"][0] and summary["loss_last"] == data["loss"][-1]
    assert summary["n_slices"] == 2 and summary["slice_thickness_A"] == pytest.approx(1.9525)
    assert summary["pixel_size_A"] == data["attrs"]["pixel_size_A"]
    assert summary["object_shape_px"] == list(data["object"].shape)
    assert summary["probe_shape_px"] == [16, 16] and summary["probe_modes"] == 1
    (rank,) = summary["per_rank"]
    for name in ("compute_s", "exchange_wait_s", "peak_memory_bytes", "predicted_memory_bytes"):
        assert rank[name] == data["ranks"][name][0]
    assert rank["peak_memory_bytes"] > 0
    # scanned area: the probe centres' bounding box over the object, computed here independently
    lo = np.ceil(data["positions_px"].min(axis=0))
    hi = np.floor(data["positions_px"].max(axis=0)) + 1
    assert summary["coverage"]["frames"] == 1.0
    assert summary["coverage"]["scanned_area"] == pytest.approx(np.prod(hi - lo) / np.prod(data["object"].shape[1:]))
    assert summary["attributes"]["loss_function"] == "amplitude"


def test_inspect_streamed_series(streamed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = inspect_json(streamed, capsys)
    assert summary["kind"] == "streamed" and summary["series_id"] == "stream-7" and summary["status"] == "complete"
    assert summary["mode"] == "async" and summary["ranks"] == 2
    assert (summary["frames_received"], summary["frames_expected"]) == (12, 16)
    assert summary["coverage"]["frames"] == 0.75
    with h5py.File(streamed, "r") as f:  # scanned area: the received frames' probe centres only
        centres, shape = f["positions_px"][...][f["received"][...]], f["object"].shape[1:]
    box = np.floor(centres.max(axis=0)) + 1 - np.ceil(centres.min(axis=0))
    assert summary["coverage"]["scanned_area"] == pytest.approx(np.prod(box) / np.prod(shape))
    assert len(centres) == 12
    assert [r["compute_s"] for r in summary["per_rank"]] == [1.5, 2.0]
    assert [r["exchange_wait_s"] for r in summary["per_rank"]] == [0.25, 0.5]
    assert [r["peak_memory_bytes"] for r in summary["per_rank"]] == [None, None]  # NaN in the file: not measured
    assert summary["virtual_kinds"] == []
    assert cli_main(["inspect", str(streamed)]) == 0
    text = capsys.readouterr().out
    assert "series id    stream-7" in text and "async, 2 workers" in text and "12 of 16 received" in text
    assert "frames 75.0 %" in text and "peak memory" not in text  # no column of NaNs
    assert [line.split()[:3] for line in text.split("timings\n")[1].splitlines()[1:]] == [["0", "1.500", "0.250"],
                                                                                           ["1", "2.000", "0.500"]]


# --- export ------------------------------------------------------------------------------------------------------


def expected_image(data: dict[str, Any], what: str) -> np.ndarray:
    """What ``--what`` should hold, computed from the HDF5 arrays here."""
    volume, probe = data["object"], data["probe"]
    if what == "phase":
        return np.angle(volume).astype(np.float64).sum(axis=0)
    if what == "slices":
        return np.angle(volume)
    if what == "amplitude":
        return np.abs(volume)
    return np.stack([np.abs(probe), np.angle(probe)])


def read_png(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """A 16-bit PNG of ``export`` back in its units, and its ``ptylive:`` text chunks."""
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I"), image.mode
        levels = np.asarray(image, dtype=np.float64)
        text = {k.removeprefix("ptylive:"): v for k, v in image.text.items() if k.startswith("ptylive:")}
    low, high = float(text["low"]), float(text["high"])
    return low + levels / 65535 * (high - low), text


@pytest.mark.parametrize("what", ["phase", "slices", "amplitude", "probe"])
def test_export_npy(result: Path, tmp_path: Path, what: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "image.npy"
    assert cli_main(["export", str(result), "--what", what, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    exported, expected = np.load(out), expected_image(contents(result), what)
    assert exported.dtype == np.float32 and exported.shape == expected.shape
    np.testing.assert_allclose(exported, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("what", ["phase", "slices", "amplitude", "probe"])
def test_export_ome_tiff(result: Path, tmp_path: Path, what: str) -> None:
    tifffile = pytest.importorskip("tifffile")
    data = contents(result)
    out = tmp_path / "image.ome.tif"
    assert cli_main(["export", str(result), "--what", what, "--format", "tiff", "-o", str(out)]) == 0
    expected = expected_image(data, what)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        exported = tif.asarray()
        axes = tif.series[0].axes
        ome = tif.ome_metadata
        x_resolution = tif.pages[0].tags["XResolution"].value
    assert exported.dtype == np.float32 and exported.shape == expected.shape
    np.testing.assert_allclose(exported, expected, rtol=1e-6, atol=1e-6)
    assert axes == {"phase": "YX", "slices": "ZYX", "amplitude": "ZYX", "probe": "CYX"}[what]
    pixel = data["attrs"]["pixel_size_A"]
    assert f'PhysicalSizeX="{pixel}"' in ome and 'PhysicalSizeXUnit="Å"' in ome
    assert x_resolution[0] / x_resolution[1] == pytest.approx(1e8 / pixel, rel=1e-6)  # pixels per cm
    assert ('PhysicalSizeZ="1.9525"' in ome) == (what in ("slices", "amplitude"))
    if what == "probe":
        assert 'Name="amplitude 0"' in ome and 'Name="phase (rad) 0"' in ome


@pytest.mark.parametrize("what", ["phase", "slices", "probe"])
def test_export_png(result: Path, tmp_path: Path, what: str, capsys: pytest.CaptureFixture[str]) -> None:
    expected = expected_image(contents(result), what)
    out = tmp_path / "image.png"
    assert cli_main(["export", str(result), "--what", what, "-o", str(out)]) == 0
    written = [Path(line.removeprefix("wrote ")) for line in capsys.readouterr().out.splitlines()]
    planes = [expected] if expected.ndim == 2 else list(expected)
    assert written == ([out] if expected.ndim == 2 else [tmp_path / f"image_{k:03d}.png" for k in range(len(planes))])
    for path, plane in zip(written, planes, strict=True):
        values, text = read_png(path)
        assert values.shape == plane.shape
        assert float(text["low"]) == pytest.approx(plane.min(), abs=1e-6)
        assert float(text["high"]) == pytest.approx(plane.max(), abs=1e-6)
        np.testing.assert_allclose(values, plane, atol=(plane.max() - plane.min()) / 65535 + 1e-6)
        assert float(text["pixel_size_A"]) == contents(result)["attrs"]["pixel_size_A"]


def test_export_without_tifffile_names_the_extra(result: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now raises ImportError
    out = tmp_path / "image.tif"
    assert cli_main(["export", str(result), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("error: TIFF export needs the tifffile package: "
                                               "pip install 'ptylive[export]'")
    assert not out.exists()


def test_export_needs_a_format(result: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["export", str(result), "-o", str(tmp_path / "image.dat")]) == 2
    assert "give --format tiff, png or npy" in capsys.readouterr().err
    assert not (tmp_path / "image.dat").exists()


# --- plot --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["result", "streamed"])
def test_plot_writes_a_png(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = request.getfixturevalue(which)
    out = tmp_path / "plot.png"
    done = run_cli("plot", str(path), "-o", str(out), "--dpi", "50")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with Image.open(out) as image:
        assert image.size == (500, 200)  # 10 × 4 in at 50 dpi
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # something drawn, not a blank canvas


def test_plot_without_matplotlib_names_the_extra(result: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli_main(["plot", str(result), "-o", str(tmp_path / "plot.png")]) == 2
    assert capsys.readouterr().err.strip() == "error: ptylive plot needs matplotlib: pip install 'ptylive[plot]'"
    assert not (tmp_path / "plot.png").exists()


# --- what is not a result ----------------------------------------------------------------------------------------


def not_results(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5\n")
    scan = tmp_path / "scan.h5"
    with h5py.File(scan, "w") as f:
        f["intensities"] = np.zeros((2, 4, 4), np.float32)
    return {"missing": (tmp_path / "absent.h5", "no such file"), "text": (text, "is not an HDF5 file"),
            "scan": (scan, "is not a ptylive result: no 'object', 'probe', 'loss', 'ranks'")}


@pytest.mark.parametrize("kind", ["missing", "text", "scan"])
@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--json"], ["export", "-o", "OUT.npy"],
                                     ["export", "-o", "OUT.tif"], ["plot", "-o", "OUT.png"]])
def test_not_a_result_is_one_error_line(kind: str, command: list[str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path, message = not_results(tmp_path)[kind]
    options = [str(tmp_path / option) if option.startswith("OUT") else option for option in command[1:]]
    assert cli_main([command[0], str(path), *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"error: {path}") and message in line
    assert not list(tmp_path.glob("OUT*"))


def test_cli_error_has_no_traceback(tmp_path: Path) -> None:
    done = run_cli("inspect", str(tmp_path / "absent.h5"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'absent.h5'}: no such file (expected a ptylive result, HDF5)"


def test_inspect_names_the_virtual_images_and_the_resume(streamed: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A streamed file's ``virtual/`` group (issue 14 item 3) and a resumed series' attributes are listed."""
    copy = tmp_path / "resumed.h5"
    shutil.copyfile(streamed, copy)
    with h5py.File(copy, "a") as f:
        group = f.create_group("virtual")
        for kind in ("com_x", "bf"):
            group[kind] = np.zeros((4, 4), np.float32)
        f.attrs["resumed_from_iteration"] = 12
    summary = inspect_json(copy, capsys)
    assert summary["virtual_kinds"] == ["bf", "com_x"]
    assert cli_main(["inspect", str(copy)]) == 0
    text = capsys.readouterr().out
    assert "virtual      bf, com_x (group virtual/)" in text and "resumed_from_iteration 12" in text



RESULTS_DOC = Path(__file__).resolve().parents[2] / "docs" / "results.md"


def documented_attributes() -> dict[str, str]:
    """docs/results.md's "Attributes" table: each backquoted name of a row's first column -> the row's meaning."""
    section = RESULTS_DOC.read_text().split("## Attributes", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    return {name: meaning for names, meaning in rows for name in re.findall(r"`([^`]+)`", names)}


def undocumented(names: set[str], documented: set[str]) -> set[str]:
    """``names`` no documented name matches (``worker_rejected_<reason>`` stands for every reason)."""
    patterns = [re.compile(re.sub(r"<[^>]+>", "[A-Za-z0-9_]+", re.escape(name)) + r"\Z") for name in documented]
    return {name for name in names if not any(p.match(name) for p in patterns)}


def test_every_attribute_a_result_file_carries_is_documented(result: Path, tmp_path: Path) -> None:
    """The offline file, and a DECTRIS series' file with its root attributes made as rank 0 makes them
    (:meth:`Rank0._final_attrs`: the scan decision of a count mismatch, a resume) and a rejected frame."""
    plan = ScanPlan(ScanRequest((8, 10)))
    plan.resolve("dectris-3", simplon_v1_count({"nimages": 1, "ntrigger": 100, "trigger_mode": "exts"}))
    resume = ResumePlan("dectris-3", Path("dectris-3.zmq"), 1, True, 12, 16)
    rank0 = SimpleNamespace(scan_plan=plan, resumes={"dectris-3": resume})
    extra = Rank0._final_attrs(rank0, "dectris-3")  # type: ignore[arg-type]  # noqa: SLF001 - rank 0's own
    assert {"scan_source", "detector_images", "detector_images_source", "count_mismatch"} <= set(extra)
    geometry = series_geometry(START, 2, 1)
    job = final_job(geometry, "dectris-3")
    job.finals[0].header["rejected"] = {"index_out_of_range": 2}
    job.finals[0].header["loss_function"] = job.finals[1].header["loss_function"] = "poisson"
    streamed = write_final(tmp_path, job.start, geometry, job.finals, extra)
    documented = set(documented_attributes())
    for path in (result, streamed):
        with h5py.File(path, "r") as f:
            names = set(f.attrs)
        assert names and not undocumented(names, documented), (path.name, sorted(undocumented(names, documented)))


def statuses_a_worker_decides() -> set[str]:
    """Every status string :func:`ptylive.daemon.worker.refine._decide` returns, read from its source."""
    tree = ast.parse(inspect.getsource(refine))
    (decide,) = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == "_decide"]
    found = set()
    for node in ast.walk(decide):
        if isinstance(node, ast.Return) and node.value is not None:
            found |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return found


def test_every_status_a_file_can_carry_is_documented() -> None:
    decided = statuses_a_worker_decides()
    assert {"complete", "incomplete", "empty", "dark"} <= decided  # the walk finds them
    written = decided | {s for s in refine.STOP_LEVELS.values() if s is not None} | {RECOVERED}
    documented = set(re.findall(r"`([a-z]+)`", documented_attributes()["status"]))
    assert written <= documented, sorted(written - documented)
