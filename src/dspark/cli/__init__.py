"""The ``dspark`` command: ``main`` builds the typer app from each subcommand's module.

- ``main``: the app, ``generate`` and the entry point ``main()``;
- ``profile``: ``dspark profile`` (cost tables).

``dspark eval|calibrate``, ``dspark train`` and ``dspark data`` live beside what they run, in
:mod:`dspark.evaluation.eval_cli`, :mod:`dspark.training.train_cli` and
:mod:`dspark.training.data_cli`.
"""
