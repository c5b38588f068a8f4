"""Bad scan files and options: one clear ``error:`` line, exit status 2, no traceback.

The errors are raised before any rank starts, so they run in this interpreter (:mod:`tests.daemon.cli_harness`);
the console script itself and a run under ``mpiexec`` are checked in real processes at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptylive.daemon.cli.launcher import find_mpiexec
from tests.daemon.cli_harness import InProcessCli


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> InProcessCli:
    return InProcessCli(capfd, monkeypatch)


def corrupt(scan: Path, tmp_path: Path, edit: Callable[[h5py.File], None]) -> Path:
    path = tmp_path / "bad.h5"
    shutil.copy(scan, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def drop_attr(name: str) -> Callable[[h5py.File], None]:
    return lambda f: f.attrs.__delitem__(name)


def replace(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[name]
        f[name] = data
    return edit


def set_value(name: str, index: tuple, value: float) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        data = f[name][...]
        data[index] = value
        f[name][...] = data
    return edit


CASES = [
    ("missing attribute", drop_attr("energy_eV"), "missing root attribute 'energy_eV'"),
    ("mismatched shapes", replace("positions_px", np.zeros((3, 2))), "must be real \\[140, 2\\]"),
    ("NaN frame", set_value("intensities", (5, 3, 3), np.nan), "intensities\\[5\\] holds NaN"),
    ("NaN position", set_value("positions_px", (7, 1), np.nan), "positions_px\\[7\\] is not finite"),
    ("position outside", set_value("positions_px", (0, 0), -40.0), "positions outside the object"),
    ("wrong dtype", replace("intensities", np.full((140, 32, 32), b"x", dtype="S1")), "must be real numbers"),
    ("missing dataset", lambda f: f.__delitem__("intensities"), "missing dataset 'intensities'"),
    ("inconsistent pixel", lambda f: f.attrs.__setitem__("pixel_size_A", f.attrs["pixel_size_A"] * 0.7),
     "is not lambda/\\(u\\*N\\*dtheta\\) for a whole u"),
]


@pytest.mark.parametrize("label, edit, message", CASES, ids=[c[0] for c in CASES])
def test_bad_scan_file_gives_one_clear_error(cli: InProcessCli, small_scan: Path, tmp_path: Path, label: str,
                                             edit: Callable[[h5py.File], None], message: str) -> None:
    bad = corrupt(small_scan, tmp_path, edit)
    result = cli("reconstruct", str(bad), "--ranks", "2", "--iterations", "1", "--out", str(tmp_path / "o.h5"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "o.h5").exists() and result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (("--slices", "0"), "slices must be >= 1"),
    (("--iterations", "0"), "iterations must be >= 1"),
    (("--ranks", "0"), "--ranks must be >= 1"),
    (("--upsampling", "0"), "upsampling must be >= 1"),
])
def test_bad_options_are_named(cli: InProcessCli, small_scan: Path, tmp_path: Path, args: tuple[str, ...],
                               message: str) -> None:
    result = cli("reconstruct", str(small_scan), "--out", str(tmp_path / "o.h5"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_any_upsampling_reconstructs_a_file_written_at_the_detector_nyquist_pixel(
        cli: InProcessCli, small_scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "u2.h5"
    result = cli("reconstruct", str(small_scan), "--upsampling", "2", "--iterations", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with h5py.File(small_scan) as f, h5py.File(out) as r:
        assert r.attrs["upsampling"] == 2
        assert r.attrs["pixel_size_A"] == pytest.approx(f.attrs["pixel_size_A"] / 2, rel=1e-12)
        nominal = r["positions_nominal_px"][...]  # as read, on the finer grid (positions_px: corrected)
        offset = nominal[0] - 2 * f["positions_px"][0]  # rescaled, shifted by whole pixels only
        np.testing.assert_allclose(nominal, 2 * f["positions_px"][...] + offset, atol=1e-12)
        assert np.all(offset == np.round(offset)) and np.all(offset >= 0)
        assert r["object"].shape[-1] >= 2 * f["intensities"].shape[-1]  # the window doubled
        assert np.isfinite(r["object"][...]).all() and r["loss"][-1] < r["loss"][0]


def test_not_a_file(cli: InProcessCli, tmp_path: Path) -> None:
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    result = cli("reconstruct", str(tmp_path / "junk.h5"), "--out", str(tmp_path / "o.h5"))
    assert result.returncode == 2 and "not a readable HDF5 file" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # nothing from the HDF5 library itself


def test_plan_from_sizes_alone_prints_table_and_json(cli: InProcessCli) -> None:
    result = cli("plan", "--ranks", "24", "--object", "1024", "1024", "--slices", "100",
                 "--positions", "462", "--window", "256")
    assert result.returncode == 0, result.stderr
    assert "exchange_buf" in result.stdout and len(result.stdout.splitlines()) == 24 + 4
    as_json = cli("plan", "--ranks", "4", "--object", "1024", "1024", "--slices", "100",
                  "--positions", "462", "--window", "256", "--json")
    ranks = json.loads(as_json.stdout)["ranks"]
    assert len(ranks) == 4 and all(r["object"] > 0 and r["total"] >= r["object"] for r in ranks)


# Real processes: what the in-process calls above cannot show. -------------------------------------

def test_the_console_script_prints_one_error_line_and_exits_2(tmp_path: Path) -> None:
    """The installed ``ptylive`` entry point, as a user runs it: stderr is exactly one line."""
    script = Path(sys.executable).with_name("ptylive")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    done = subprocess.run([str(script), "reconstruct", str(tmp_path / "junk.h5"), "--ranks", "2", "--out",
                           str(tmp_path / "o.h5")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert re.fullmatch(r"error: \S+junk\.h5: not a readable HDF5 file \(.*\)\n", done.stderr), done.stderr


@pytest.mark.mpi
def test_under_mpiexec_rank_0_alone_reports_a_rank_count_mismatch(small_scan: Path, tmp_path: Path) -> None:
    """``mpiexec -n 2 ptylive reconstruct --ranks 3``: validated on rank 0, one line, every rank exits 2."""
    command = [find_mpiexec(), "-n", "2", sys.executable, "-m", "ptylive.daemon.cli.main", "reconstruct",
               str(small_scan), "--ranks", "3", "--iterations", "1", "--out", str(tmp_path / "o.h5")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "error: --ranks 3 but mpiexec started 2 ranks\n"
    assert not (tmp_path / "o.h5").exists()


def test_reconstruct_takes_o_for_out(small_scan: Path, tmp_path: Path) -> None:
    from ptylive.daemon.cli.main import build_parser

    args = build_parser().parse_args(["reconstruct", str(small_scan), "-o", str(tmp_path / "r.h5")])
    assert args.out == tmp_path / "r.h5"
