"""The TEDM worker process (``tedm serve``), its protocol and a client.

``protocol`` and ``client`` need numpy and the standard library only (the 3D Slicer module
imports them in Slicer's own process, where torch is never imported); ``worker`` and ``server``
run in the worker process. See docs/worker_protocol.md.
"""
