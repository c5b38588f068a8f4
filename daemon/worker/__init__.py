"""A worker rank of ``ptylive serve``.

The rank loop takes frames and control messages from the ingest and reports to rank 0
(:mod:`.rank`); the streaming refinement runs the engine over the frames received so far
(:mod:`.refine`); the frame store keeps each series' frames in preallocated rows (:mod:`.frames`);
the stats are what heartbeats carry (:mod:`.stats`). Workers speak to rank 0 only through the
messages of :mod:`ptylive.daemon.service.messages`.
"""
