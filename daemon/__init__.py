"""ptylive.daemon: everything that wires the kernels (:mod:`ptylive.gpu`) and the streams
(:mod:`ptylive.streaming`) into a reconstruction service, in role sub-packages.

Imports flow downwards only (checked by import-linter in CI)::

    cli      the ``ptylive`` command: argument parsing, sub-commands, the MPI launcher, demo, the offline job
    worker   a worker rank of ``ptylive serve``: rank loop, streaming refinement, frame store, stats
    service  rank 0 of ``ptylive serve``: supervisor, collector, results, metrics, notify, config, messages
    http     the operator's HTTP surface: server, request parsing, streams, SSE, viewer assets
    engine   one rank's reconstruction: options, gradient, sync/async iteration, decomposition, geometry,
             memory plan, and its halo exchange (``engine.exchange``)

See ``docs/architecture.md`` for the data paths through these packages.
"""
