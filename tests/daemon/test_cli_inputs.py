"""Bad scan files and options: one clear ``error:`` line, exit status 2, no traceback."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import run_cli


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
]


@pytest.mark.parametrize("label, edit, message", CASES, ids=[c[0] for c in CASES])
def test_bad_scan_file_gives_one_clear_error(small_scan: Path, tmp_path: Path, label: str,
                                             edit: Callable[[h5py.File], None], message: str) -> None:
    bad = corrupt(small_scan, tmp_path, edit)
    result = run_cli("reconstruct", str(bad), "--ranks", "2", "--iterations", "1", "--out", str(tmp_path / "o.h5"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert pytest.importorskip("re").search(message, result.stderr), result.stderr
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("args, message", [
    (("--slices", "0"), "slices must be >= 1"),
    (("--iterations", "0"), "iterations must be >= 1"),
    (("--ranks", "0"), "--ranks must be >= 1"),
    (("--upsampling", "2"), "does not match"),
])
def test_bad_options_are_named(small_scan: Path, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = run_cli("reconstruct", str(small_scan), "--out", str(tmp_path / "o.h5"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    result = run_cli("reconstruct", str(tmp_path / "junk.h5"), "--out", str(tmp_path / "o.h5"))
    assert result.returncode == 2 and "not a readable HDF5 file" in result.stderr


def test_plan_from_sizes_alone_prints_table_and_json() -> None:
    result = run_cli("plan", "--ranks", "24", "--object", "1024", "1024", "--slices", "100",
                     "--positions", "462", "--window", "256")
    assert result.returncode == 0, result.stderr
    assert "exchange_buf" in result.stdout and len(result.stdout.splitlines()) == 24 + 4
    as_json = run_cli("plan", "--ranks", "4", "--object", "1024", "1024", "--slices", "100",
                      "--positions", "462", "--window", "256", "--json")
    import json

    ranks = json.loads(as_json.stdout)["ranks"]
    assert len(ranks) == 4 and all(r["object"] > 0 and r["total"] >= r["object"] for r in ranks)
