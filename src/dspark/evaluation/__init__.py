"""Evaluation harness: built-in prompt sets, eval metrics, the interleaved runner, reports.

``dspark eval`` (eval_cli.eval_command) and ``dspark calibrate`` (eval_cli.calibrate_command).
Nothing heavy is imported here, so ``dspark --help`` stays fast.
"""
