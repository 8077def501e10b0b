"""Write the table of docs/errors.md: every case of tests/test_cli_errors.py, run for real.

    PYTHONPATH=src python scripts/bad_inputs_table.py             # rewrite the table in docs/errors.md
    PYTHONPATH=src python scripts/bad_inputs_table.py --print     # print it to stdout instead
    PYTHONPATH=src python scripts/bad_inputs_table.py --print --fast --jobs 1

Each case runs ``python -m dspark ...`` in a subprocess exactly as the test does; the table
shows the one line it printed (the temporary folder the cases run in reads ``<tmp>``, the
package's src folder ``<src>``). docs/errors.md keeps everything up to its marker line
(``MARKER``) and gets the table below it. A case that does not behave as the test requires is
reported on stderr, the file is left alone, and the script exits 1. ``--fast`` leaves out the
cases that load the real model (print only). About a hundred subprocesses, each importing
torch: a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_cli_errors import CASES, SRC, build_world, busy_port, check_result, run_case  # noqa: E402

CELL = 180
"""Characters of a printed line kept in the table."""
DOC = REPO / "docs" / "errors.md"
MARKER = "<!-- scripts/bad_inputs_table.py writes everything below this line -->"


def cell(text: str) -> str:
    text = text if len(text) <= CELL else text[: CELL - 1] + "…"
    return text.replace("|", "\\|")


def shown_args(args: tuple) -> str:
    parts = [a if isinstance(a, str) else repr(a) for a in args]
    return "`dspark " + " ".join(p if p and " " not in p else repr(p) for p in parts).replace("{w}", "<tmp>").replace("{port}", "<port>") + "`"


def table(cases: list, jobs: int) -> tuple[list[str], int]:
    """The table's lines, and how many cases did not behave as required."""
    lines = ["| command | what is wrong | invocation | what it prints (exit 2) |", "|---|---|---|---|"]
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dspark-bad-inputs-") as tmp:
        world = build_world(Path(tmp).resolve(), with_model_files=any(c.slow for c in cases))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda c: run_case(c, world), cases))
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
            lines.append(f"| {case.command} | {cell(case.problem)} | {cell(shown)} | {cell(line)} |")
    return lines, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", dest="to_stdout", action="store_true", help="Print the table instead of writing docs/errors.md.")
    parser.add_argument("--fast", action="store_true", help="Leave out the cases that load the real model (with --print only).")
    parser.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="Cases run at once.")
    options = parser.parse_args()
    if options.fast and not options.to_stdout:
        parser.error("--fast leaves cases out, so it only prints: add --print")
    if options.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {options.jobs}")
    doc = DOC.read_text(encoding="utf-8") if not options.to_stdout else ""
    if not options.to_stdout and MARKER not in doc:
        parser.error(f"{DOC} lacks the marker line {MARKER}")
    cases = [c for c in CASES if not (options.fast and c.slow)]
    lines, failed = table(cases, options.jobs)
    print(f"{len(cases) - failed} of {len(cases)} cases behave as required.", file=sys.stderr)
    if options.to_stdout:
        print("\n".join(lines))
    elif not failed:
        DOC.write_text(doc[: doc.index(MARKER) + len(MARKER)] + "\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines) - 2} rows to {DOC.relative_to(REPO)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
