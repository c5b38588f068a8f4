#!/usr/bin/env python
"""Forward-model cross-check: abTEM (make_cases.py --crosscheck) against ptylive's own model.

Two steps, two venvs::

    /work/abtem-venv/bin/python tests/data/abtem/make_cases.py --crosscheck /tmp/xc.npz
    .venv/bin/python tests/data/abtem/crosscheck.py /tmp/xc.npz

The second step builds ptylive's probe from the same optics (``ptylive.gpu.probe.make_probe``),
transmits it through ``exp(i σ v)`` of abTEM's potential resampled to ptylive's grid
(``ptylive.gpu.multislice.forward`` with ``fresnel_propagator``), and compares with abTEM:

* vacuum: the complex real-space probe (defocus sign, centring, sub-pixel shift sign) and the
  far field pixel for pixel;
* thin / multi: one slice / four slices 10 Å apart of random atoms (no symmetry): far-field
  correlation, next to the same comparison after a transpose, a flip, or with the opposite defocus
  (each of which a convention error would produce);
* binned: the production geometry (cell 3 windows wide, 3×3 detector binning, soft aperture).

It exits non-zero if a check fails.
"""

from __future__ import annotations

import sys

import numpy as np

from ptylive.gpu.multislice import forward
from ptylive.gpu.physics import wavelength_A
from ptylive.gpu.probe import ProbeOptics, fourier_shift, make_probe
from ptylive.gpu.propagation import fresnel_propagator


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def complex_match(a: np.ndarray, b: np.ndarray) -> float:
    """|<a, b>| / (|a| |b|): 1 when equal up to a global complex factor."""
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(path: str) -> int:
    d = np.load(path)
    energy, alpha = float(d["energy_eV"]), float(d["convergence_semiangle_mrad"])
    pixel, n, sigma = float(d["pixel_size_A"]), int(d["detector_px"]), float(d["sigma"])
    lam = wavelength_A(energy)
    failures = []

    def probe(defocus: float) -> np.ndarray:
        return make_probe(ProbeOptics(energy, alpha, defocus), n, pixel, dtype=np.complex128)

    def model(label: str, defocus: float) -> np.ndarray:
        position = d[f"{label}_position_px"]
        start = np.floor(position).astype(int) - n // 2
        shift = (position - np.floor(position))[None]
        if f"{label}_potential" in d:
            v = d[f"{label}_potential"]
            transmission = np.exp(1j * sigma * v)[:, start[0]:start[0] + n, start[1]:start[1] + n]
            dz = float(d[f"{label}_dz"])
        else:
            transmission, dz = np.ones((1, n, n), complex), 0.0
        propagator = fresnel_propagator(np, n, pixel, lam, dz, dtype=np.complex128)
        field = forward(probe(defocus), shift, transmission[:, None].copy(), propagator, n)
        return np.abs(field[0]) ** 2

    print(f"{'check':34s} {'value':>10s}   (a convention error would give)")
    subpixel = (d["vacuum_position_px"] - np.floor(d["vacuum_position_px"]))[None]
    for sign, defocus in (("p", 80.0), ("m", -80.0)):
        ours = fourier_shift(probe(defocus), subpixel)[0]
        theirs = d[f"vacuum_{sign}_probe"]
        opposite = fourier_shift(probe(-defocus), subpixel)[0]
        match, wrong = complex_match(ours, theirs), complex_match(opposite, theirs)
        transposed = complex_match(ours.T, theirs)
        print(f"vacuum probe, defocus {defocus:+.0f} A: complex match {match:10.6f}   (opposite defocus {wrong:.3f}, "
              f"transposed {transposed:.3f})")
        if match < 0.9999 or wrong > 0.9:
            failures.append(f"vacuum probe {defocus:+}")
        ours_far, theirs_far = model("vacuum", defocus), d[f"vacuum_{sign}_pattern"]
        rel = float(np.abs(ours_far - theirs_far).max() / theirs_far.max())
        print(f"vacuum far field, defocus {defocus:+.0f} A: max |diff|/max {rel:10.2e}   (sums {ours_far.sum():.6f} "
              f"ptylive, {theirs_far.sum():.6f} abTEM)")
        if rel > 1e-4:
            failures.append(f"vacuum far field {defocus:+}")
    for label, threshold in (("thin", 0.999), ("multi", 0.999), ("binned", 0.97), ("crystal", 0.99)):
        for sign, defocus in (("p", 80.0), ("m", -80.0)):
            # the object's effect: pattern minus the same code's vacuum pattern (the bright-field
            # disc alone is symmetric and would hide transposes and defocus-sign errors)
            theirs = d[f"{label}_{sign}_pattern"] - d[f"{label}_{sign}_vacuum"]
            ours = model(label, defocus) - model("vacuum", defocus)
            full = corr(model(label, defocus), d[f"{label}_{sign}_pattern"])
            c = corr(ours, theirs)
            alternatives = {"transposed": corr(ours, theirs.T), "flipped": corr(ours, theirs[::-1, ::-1]),
                            "opposite defocus": corr(model(label, -defocus) - model("vacuum", -defocus), theirs)}
            worst = max(alternatives.values())
            alt = ", ".join(f"{k} {v:.3f}" for k, v in alternatives.items())
            print(f"{label:6s} object signal, defocus {defocus:+.0f} A: corr {c:10.6f}   ({alt}); "
                  f"whole pattern corr {full:.6f}")
            # the crystal is nearly symmetric under a transpose or flip: only its defocus sign discriminates
            discriminating = alternatives["opposite defocus"] if label == "crystal" else worst
            if c < threshold or full < threshold or discriminating > c - 0.05:
                failures.append(f"{label} {defocus:+}")
    print("FAILED: " + ", ".join(failures) if failures else "all cross-checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/xc.npz"))
