"""Rank 0 of ``ptylive serve``: the service an operator talks to.

The supervisor runs the ingest, collector and HTTP threads and the lifecycle (:mod:`.supervisor`);
the collector stitches tile previews and publishes them (:mod:`.collector`); final files are written
by :mod:`.results`; Prometheus metrics, sd_notify, the TOML configuration, the worker messages, the
preview images and a child-process runner for tests and the demo sit beside them. The service knows
workers only by their messages; it imports neither the worker nor the CLI.
"""
