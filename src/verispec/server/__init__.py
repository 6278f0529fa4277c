"""``verispec serve``: an OpenAI-compatible server with continuous batching and batched speculation.

- :mod:`verispec.server.scheduler`: the worker thread that admits, steps (with the library's
  :func:`verispec.engine.step`), delivers and cancels requests;
- :mod:`verispec.server.app`: the FastAPI routes; :mod:`verispec.server.schemas` their bodies;
- :mod:`verispec.server.metrics`: Prometheus metrics; :mod:`verispec.server.command`: the CLI.

Needs the ``server`` extra (``pip install 'verispec[server]'``).
"""
