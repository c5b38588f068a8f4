"""The operator's HTTP surface on rank 0.

The server and its routes (:mod:`.server`), request parsing and checks (:mod:`.requests`), long
answers such as event streams and file downloads (:mod:`.streams`), the server-sent events hub
(:mod:`.sse`) and the viewer's static assets (:mod:`.viewer`, files in ``viewer/``). It reads what
the service hands it through callables and imports nothing of the service.
"""
