"""``ptylive service install``: the deployment files come out of the package, the unit runs this installation.

The slow test builds the wheel, installs it into a fresh venv and verifies the unit that venv's ``ptylive``
writes with ``systemd-analyze verify`` (skipped like :mod:`tests.daemon.test_systemd` without it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from ptylive.daemon.cli.service_install import FILES, UNIT, install, ptylive_command, unit_text
from tests.daemon.cli_harness import InProcessCli
from tests.daemon.test_systemd import SYSTEMD, systemd_analyze

ROOT = Path(__file__).resolve().parents[2]


def test_every_packaged_file_is_written_where_the_host_reads_it(tmp_path: Path) -> None:
    written = install(tmp_path, command=["/opt/ptylive/venv/bin/ptylive"])
    assert written == [tmp_path / target for _, target in FILES]
    for source, target in FILES:
        if target != UNIT:
            assert (tmp_path / target).read_bytes() == (SYSTEMD / source).read_bytes(), source
        assert (tmp_path / target).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "etc/systemd/system/ptylive.service").is_file()
    assert (tmp_path / "etc/ptylive/ptylive.toml").is_file()
    assert (tmp_path / "var/lib/grafana/dashboards/ptylive/ptylive-dashboard.json").is_file()


def test_the_unit_runs_the_given_command_with_its_folder_first_on_path() -> None:
    text = unit_text((SYSTEMD / "ptylive.service").read_text(), ["/srv/my venv/bin/ptylive"])
    assert '\nExecStart="/srv/my venv/bin/ptylive" serve --config /etc/ptylive/ptylive.toml\n' in text
    assert "\nEnvironment=PATH=/srv/my venv/bin:/usr/local/bin:/usr/bin:/bin\n" in text
    assert "/usr/bin/env ptylive" not in text
    percent = unit_text((SYSTEMD / "ptylive.service").read_text(), ["/opt/100%/python", "-P", "-m", "x"])
    assert '\nExecStart="/opt/100%%/python" -P -m x serve' in percent  # % is a systemd specifier


def test_the_command_is_the_script_beside_the_interpreter_else_python_minus_p(tmp_path: Path) -> None:
    assert ptylive_command() == [str(Path(sys.executable).parent / "ptylive")]  # the test venv has the script
    (tmp_path / "python").touch()
    assert ptylive_command(str(tmp_path / "python")) == [str(tmp_path / "python"), "-P", "-m",
                                                          "ptylive.daemon.cli.main"]


def test_cli_refuses_to_overwrite_without_force_and_says_what_to_do_next(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cli = InProcessCli(capfd, monkeypatch)
    first = cli("service", "install", "--prefix", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert f"wrote {tmp_path / UNIT}" in first.stdout
    assert "systemctl daemon-reload" in first.stdout and "systemctl enable --now ptylive" in first.stdout
    config = tmp_path / "etc/ptylive/ptylive.toml"
    config.write_text("# edited\n")
    again = cli("service", "install", "--prefix", str(tmp_path))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith("error: not overwriting ") and str(config) in again.stderr
    assert "--force" in again.stderr and "Traceback" not in again.stderr
    assert config.read_text() == "# edited\n"
    forced = cli("service", "install", "--prefix", str(tmp_path), "--force")
    assert forced.returncode == 0 and config.read_bytes() == (SYSTEMD / "ptylive.toml").read_bytes()


def test_the_written_unit_verifies(tmp_path: Path) -> None:
    install(tmp_path)
    done = subprocess.run([systemd_analyze(), "verify", str(tmp_path / UNIT)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr + done.stdout


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_ships_the_files_and_writes_a_unit_that_verifies(tmp_path: Path) -> None:
    """The wheel carries every file; its ``ptylive`` writes them from the installed package, not the checkout.

    The fresh venv has no ptylive but the wheel's; the dependencies come from this venv's site-packages through
    a ``.pth`` line (a folder listed there is not a site folder: this venv's editable install stays out).
    """
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("ptylive-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"ptylive/systemd/{source}" for source, _ in FILES} <= names
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    fresh_python = fresh / "bin" / "python"
    site = Path(subprocess.run([fresh_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "-q",
                                "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    prefix = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([fresh / "bin" / "ptylive", "service", "install", "--prefix", str(prefix)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    unit = (prefix / UNIT).read_text()
    assert f"\nExecStart={fresh / 'bin' / 'ptylive'} serve --config /etc/ptylive/ptylive.toml\n" in unit
    where = subprocess.run([fresh_python, "-P", "-c", "import ptylive.systemd as s; print(s.__file__)"],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert where.startswith(str(site)), where
    verified = subprocess.run([systemd_analyze(), "verify", str(prefix / UNIT)], capture_output=True, text=True,
                              timeout=60)
    assert verified.returncode == 0 and verified.stderr == "" and verified.stdout == "", verified.stderr


@pytest.mark.slow
def test_the_sdist_carries_the_service_files_and_the_license_and_its_wheel_the_service_files(tmp_path: Path) -> None:
    """A pip user installing from the sdist gets what ``ptylive service install`` writes: the sdist holds
    ``systemd/`` (unit, example config, Prometheus job, Grafana dashboard and provisioning) and LICENSE, and the
    wheel pip builds from it holds them as package data.

    Built from a copy of the checkout's files (tracked, and untracked ones git does not ignore): setuptools adds
    every file an existing ``*.egg-info/SOURCES.txt`` lists, so a build in the checkout, whose editable install
    left one, would hold a file that the package data no longer names.
    """
    source = tmp_path / "source"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is listed too
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (sdist,) = (tmp_path / "dist").glob("ptylive-*.tar.gz")
    top = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
        metadata = archive.extractfile(f"{top}/PKG-INFO").read().decode()  # type: ignore[union-attr]
    assert {f"{top}/systemd/{source}" for source, _ in FILES} <= names
    assert any(source.startswith("grafana/") for source, _ in FILES)  # the dashboard and provisioning among them
    assert f"{top}/LICENSE" in names and "\nLicense-File: LICENSE\n" in metadata
    wheel_built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(sdist), "--no-deps", "-q", "-w",
                                  str(tmp_path / "wheels")], capture_output=True, text=True, timeout=600)
    assert wheel_built.returncode == 0, wheel_built.stderr
    (wheel,) = (tmp_path / "wheels").glob("ptylive-*.whl")
    assert {f"ptylive/systemd/{source}" for source, _ in FILES} <= set(zipfile.ZipFile(wheel).namelist())
