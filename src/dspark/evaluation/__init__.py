"""Evaluation harness: built-in prompt sets, eval metrics, the interleaved runner, reports.

``dspark eval`` and ``dspark calibrate`` (:mod:`dspark.cli.eval`) run it. Nothing heavy is
imported here, so ``dspark --help`` stays fast.
"""
