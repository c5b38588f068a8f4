"""ptylive: real-time multislice electron ptychography.

The sub-packages live in the repository's top-level folders (see ``docs/architecture.md``):
``ptylive.gpu`` (array kernels), ``ptylive.streaming`` (wire protocols),
``ptylive.daemon`` (CLI, MPI roles, halo exchange) and ``ptylive.tools`` (benchmarks).
"""

__version__ = "0.1.0"
