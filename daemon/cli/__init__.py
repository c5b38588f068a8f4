"""The ``ptylive`` command line.

Argument parsing (:mod:`.main`, the console entry point), what each sub-command does
(:mod:`.commands`), re-launching under ``mpiexec`` (:mod:`.launcher`), the demo (:mod:`.demo`), the
offline job of ``ptylive reconstruct`` (:mod:`.offline`) and which role each rank of ``ptylive serve``
plays (:mod:`.serve`). This is the top layer: it may import every other package, and nothing imports
it. The rank roles live here rather than in :mod:`ptylive.daemon.service` because they start both the
service (rank 0) and the workers, and the workers sit above the service they report to.
"""
