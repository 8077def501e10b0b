"""The ``dspark`` command: one module per subcommand, each a typed function over the library.

- ``main``: the app, ``generate`` and the entry point ``main()``;
- ``edge``: the one error boundary (``BoundaryGroup``) and the checks on outputs;
- ``eval``: ``dspark eval`` and ``dspark calibrate``; ``train``: ``dspark train``;
  ``data``: ``dspark data ...``; ``batch``, ``serve``, ``convert``, ``profile``.

Only this package imports typer: everything below it can be used as a library.
"""
