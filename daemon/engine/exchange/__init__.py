"""Halo gradient exchange between ranks whose extended tiles overlap.

The exchanger protocols the engine is typed against (:mod:`.protocols`), the exact synchronous
exchange (:mod:`.sync`), the method's three-buffer asynchronous exchange (:mod:`.asynchronous`), the
workers' per-tick agreement (:mod:`.consensus`) and the gathering of tiles on rank 0 (:mod:`.gather`).
"""
