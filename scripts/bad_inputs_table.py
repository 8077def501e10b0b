"""Print the README's "Bad inputs" table: every case of tests/test_cli_errors.py, run for real.

    PYTHONPATH=src python scripts/bad_inputs_table.py [--fast] > table.md

Each case runs ``python -m dspark ...`` in a subprocess exactly as the test does; the table
shows the one line it printed (the temporary folder the cases run in reads ``<tmp>``, the
package's src folder ``<src>``). A case
that does not behave as the test requires is reported on stderr and the script exits 1.
``--fast`` leaves out the cases that load the real model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_cli_errors import CASES, SRC, build_world, busy_port, check_result, run_case  # noqa: E402

CELL = 180
"""Characters of a printed line kept in the table."""


def cell(text: str) -> str:
    text = text if len(text) <= CELL else text[: CELL - 1] + "…"
    return text.replace("|", "\\|")


def shown_args(args: tuple) -> str:
    parts = [a if isinstance(a, str) else repr(a) for a in args]
    return "`dspark " + " ".join(p if p and " " not in p else repr(p) for p in parts).replace("{w}", "<tmp>").replace("{port}", "<port>") + "`"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="Leave out the cases that load the real model.")
    options = parser.parse_args()
    cases = [c for c in CASES if not (options.fast and c.slow)]
    with tempfile.TemporaryDirectory(prefix="dspark-bad-inputs-") as tmp:
        world = build_world(Path(tmp).resolve(), with_model_files=any(c.slow for c in cases))
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            results = list(pool.map(lambda c: run_case(c, world), cases))
        print("| command | what is wrong | invocation | what it prints (exit 2) |")
        print("|---|---|---|---|")
        failed = 0
        for case, result in zip(cases, results):
            try:
                line = check_result(case, result)
            except AssertionError as exc:
                failed += 1
                print(f"FAILED {case.id}: {exc}", file=sys.stderr)
                line = f"(unexpected: exit {result.returncode})"
            line = line.replace(str(world), "<tmp>").replace(str(SRC), "<src>").replace(f":{busy_port()}", ":<port>")
            if case.usage:
                line = f"click's usage message: {line}"
            shown = shown_args(case.args).replace(str(world), "<tmp>").replace(str(SRC), "<src>")
            print(f"| {case.command} | {cell(case.problem)} | {cell(shown)} | {cell(line)} |")
    print(f"\n{len(cases) - failed} of {len(cases)} cases behave as required.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
