"""The ``verispec`` command line: :mod:`~verispec.cli.main` (the subcommands) and
:mod:`~verispec.cli.options` (options shared with ``bench`` and ``serve``)."""
