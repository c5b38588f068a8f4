"""py4DSTEM's multislice ptychography on a ptylive scan file (run in py4DSTEM's own venv).

The run contract (arguments, outputs, timing) is in ``_common.py``. What py4DSTEM is given:

* the intensities as a DataCube (scan rows × cols when the positions are a raster, else n × 1), with
  the detector's angular pixel (``detector_pixel_mrad``) as its Q calibration;
* the positions of the file, in Å (``positions_px × pixel_size_A``), as ``initial_scan_positions``;
* the optics of the file: ``energy``, ``semiangle_cutoff`` and ``defocus`` (py4DSTEM's ``defocus`` is
  −C10, as the file's ``defocus_A``), from which py4DSTEM builds its own initial probe; or, when the
  benchmark passes ``--probe`` (the file's true probe), that probe, corner-centred and scaled to the
  mean diffraction intensity as py4DSTEM scales its own;
* the facts of the geometry that the file fixes: zero frequency at pixel (D//2, D//2)
  (``force_com_shifts``), no rotation or transpose between scan and detector;
* ``num_slices`` and ``slice_thicknesses`` as given.

Everything else is py4DSTEM's default for ``reconstruct`` (gradient descent, step 0.5, the whole scan
per update, probe refined, positions fixed). One ``reconstruct(num_iter=1, reset=False)`` call per
iteration continues the same reconstruction (py4DSTEM keeps its state between calls).
"""

from __future__ import annotations

import logging
import sys
import warnings
from importlib.metadata import version
from typing import Any

import numpy as np
from _common import load_scan, parse_arguments, run_with_checkpoints, to_ptylive_grid, write_outputs

logger = logging.getLogger(__name__)


def _probe_guess(path: Any, mean_intensity: float) -> np.ndarray:
    """The file's probe (centred at N//2) as py4DSTEM wants it: corner-centred, Σ|FFT(P)|² = mean intensity."""
    probe = np.fft.ifftshift(np.load(path)).astype(np.complex64)
    return probe * np.sqrt(mean_intensity / np.sum(np.abs(np.fft.fft2(probe)) ** 2))


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s py4dstem_run %(message)s", stream=sys.stderr)
    warnings.filterwarnings("ignore")
    import py4DSTEM

    scan = load_scan(args.scan)
    d = scan.detector_px
    grid = scan.grid_shape() or (len(scan.positions_px), 1)
    datacube = py4DSTEM.DataCube(data=scan.intensities.reshape(*grid, d, d))
    datacube.calibration.set_R_pixel_size(scan.pixel_size_A)
    datacube.calibration.set_R_pixel_units("A")
    datacube.calibration.set_Q_pixel_size(scan.detector_pixel_mrad)
    datacube.calibration.set_Q_pixel_units("mrad")
    mean_intensity = float(scan.intensities.sum(axis=(1, 2)).mean())
    probe = None if args.probe is None else _probe_guess(args.probe, mean_intensity)
    ptycho = py4DSTEM.process.phase.MultislicePtychography(
        energy=scan.energy_eV, num_slices=args.slices, slice_thicknesses=args.slice_thickness_A,
        datacube=datacube, semiangle_cutoff=scan.convergence_semiangle_mrad, defocus=scan.defocus_A,
        initial_scan_positions=scan.positions_px * scan.pixel_size_A, initial_probe_guess=probe,
        verbose=False, device="cpu")
    ptycho.preprocess(plot_center_of_mass=False, plot_rotation=False, plot_probe_overlaps=False,
                      force_com_rotation=0.0, force_com_transpose=False, force_com_shifts=(d // 2, d // 2))
    sampling = float(ptycho.sampling[0])
    if abs(sampling / scan.pixel_size_A - 1) > 1e-4:
        raise ValueError(f"py4DSTEM's object pixel {sampling} A differs from the file's {scan.pixel_size_A} A")
    offset = np.asarray(ptycho._positions_px, np.float64).mean(axis=0) - scan.positions_px.mean(axis=0)
    shape = tuple(args.object_shape)

    def step() -> float:
        ptycho.reconstruct(num_iter=1, reset=False, progress_bar=False)
        return float(ptycho.error)

    def snapshot() -> tuple[np.ndarray, np.ndarray]:
        phases = to_ptylive_grid(np.angle(np.asarray(ptycho._object)), offset, shape)
        return phases, np.asarray(ptycho._positions_px, np.float64) - offset

    done = run_with_checkpoints(step, snapshot, args.iterations, args.time_budget_s)  # no warm-up: numpy
    write_outputs(args.out, done, {
        "code": "py4DSTEM", "version": version("py4DSTEM"), "class": "MultislicePtychography",
        "probe": "the file's probe" if probe is not None else
        f"py4DSTEM's own from the optics (energy {scan.energy_eV:g} eV, semiangle {scan.convergence_semiangle_mrad:g}"
        f" mrad, defocus {scan.defocus_A:g} A, rolloff 2.0 default)",
        "settings": "py4DSTEM defaults: gradient-descent, step_size 0.5, max_batch_size None (whole scan), "
                    "probe refined, positions fixed",
        "loss_metric": "py4DSTEM error (normalised amplitude error)",
        "offset_px": offset.tolist(), "object_shape_peer": list(np.shape(ptycho._object)),
        "scan_grid": list(grid)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
