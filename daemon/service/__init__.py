"""Rank 0 of ``ptylive serve``: the service an operator talks to.

The supervisor runs the ingest, collector and HTTP threads and the lifecycle (:mod:`.supervisor`);
the collector reads the workers' messages (:mod:`.collector`) and hands them to the roster of workers
(:mod:`.roster`), the per-series mosaics and tiles HTTP serves (:mod:`.series_views`) and the preview
PUB and event publisher (:mod:`.publisher`); final files are written by :mod:`.results` on the final
writer's thread (:mod:`.final_writer`); Prometheus metrics, sd_notify, the TOML configuration, the
worker messages, the preview images and a child-process runner for tests and the demo sit beside them. The service knows
workers only by their messages; it imports neither the worker nor the CLI.
"""
