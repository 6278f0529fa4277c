"""``verispec serve``: an OpenAI-compatible server with continuous batching and batched speculation.

- :mod:`verispec.server.scheduler`: the worker thread that batches sequences between target passes;
- :mod:`verispec.server.policy`: how many tokens each sequence drafts, per batch;
- :mod:`verispec.server.app`: the FastAPI routes; :mod:`verispec.server.schemas` their bodies;
- :mod:`verispec.server.metrics`: Prometheus metrics; :mod:`verispec.server.command`: the CLI.

Needs the ``server`` extra (``pip install 'verispec[server]'``).
"""
