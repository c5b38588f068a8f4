"""One rank's reconstruction engine, shared by ``ptylive reconstruct`` and the streaming workers.

The iteration options, the tile state and its set-up, the local gradient of a mini-batch, the one
update step, the synchronous and asynchronous iterations, the decomposition into tiles, probe groups
and extended tiles, the series geometry and the memory plan. The halo exchange between ranks is the
sub-package :mod:`.exchange`. The engine imports no sockets and no HTTP; MPI only through the
exchangers it is handed.
"""
