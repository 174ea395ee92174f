"""Write docs/robustness.md: every robustness scenario, what was expected and what was observed.

The scenarios are the parameter tables of ``tests/test_robustness.py`` (imported, not copied):
each row is built in a fresh temporary folder and run through ``mrisynth.cli.main`` exactly as the
tests run it, and the exit code and message observed are recorded. The tests that are not table
rows (processes killed with SIGKILL, concurrent writers, resumed training) are run with pytest and
reported with their docstrings.

    .venv/bin/python scripts/robustness_table.py            # writes docs/robustness.md
    .venv/bin/python scripts/robustness_table.py --stdout   # prints it instead
    .venv/bin/python scripts/robustness_table.py --no-pytest  # table rows only (a few seconds)
"""
from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DOC = REPO / "docs" / "robustness.md"


def cell(text: str) -> str:
    """Text for one Markdown table cell (pipes escaped, one line)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code_cell(text: str) -> str:
    text = cell(text)
    return f"`{text}`" if text else ""


def run_tables(T) -> tuple[list[str], int, int]:
    """One Markdown section per table of the test module ``T``; (lines, rows, rows as expected)."""
    lines: list[str] = []
    n_rows = n_ok = 0
    for title, scenarios in T.TABLES.items():
        lines += [f"## {title}", "", "| case | expected | observed exit code | observed message | as expected |",
                  "|---|---|---:|---|:---:|"]
        for scenario in scenarios:
            with tempfile.TemporaryDirectory(prefix="mrisynth-robustness-") as tmp:
                root = Path(tmp).resolve()
                try:
                    ws, seen = T.run_scenario(scenario, root)
                except Exception as exc:  # noqa: BLE001 - a traceback is exactly what this table must show
                    code, message, ok = "exception", f"{type(exc).__name__}: {exc}", False
                else:
                    code, message = str(seen.code), seen.message(scenario.message, root)
                    try:
                        T.assert_scenario(scenario, ws, seen)
                        ok = True
                    except AssertionError:
                        ok = False
            expected = f"exit {scenario.code}" + (f", `{cell(scenario.message)}`" if scenario.message else "")
            lines.append(f"| {cell(scenario.name)} | {expected} | {code} | {code_cell(message)} | {'yes' if ok else '**NO**'} |")
            n_rows += 1
            n_ok += ok
        lines.append("")
    return lines, n_rows, n_ok


def run_fault_tests(T) -> tuple[list[str], int, int]:
    """The non-table tests, run by pytest; one row per test function with its docstring."""
    names = [f.__name__ for f in T.FAULT_TESTS]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                   "tests/test_robustness.py", "-k", " or ".join(names)]
        subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        outcomes: dict[str, list[tuple[bool, float]]] = {name: [] for name in names}
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            name = case.get("name", "").split("[")[0]
            if name in outcomes:
                failed = any(child.tag in ("failure", "error") for child in case)
                skipped = any(child.tag == "skipped" for child in case)
                if not skipped:
                    outcomes[name].append((not failed, float(case.get("time", 0))))
    lines = ["## Faults: killed processes, concurrent writers, resumed training", "",
             "| test | what it checks | observed | as expected |", "|---|---|---|:---:|"]
    n_ok = 0
    for function in T.FAULT_TESTS:
        runs = outcomes[function.__name__]
        passed = sum(ok for ok, _ in runs)
        seconds = sum(t for _, t in runs)
        doc = inspect.getdoc(function) or ""
        ok = bool(runs) and passed == len(runs)
        n_ok += ok
        observed = f"{passed} of {len(runs)} passed ({seconds:.1f} s)" if runs else "not run"
        lines.append(f"| `{function.__name__}` | {cell(doc.split(chr(10) + chr(10))[0])} | {observed} | {'yes' if ok else '**NO**'} |")
    lines.append("")
    return lines, len(T.FAULT_TESTS), n_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print the Markdown instead of writing docs/robustness.md")
    parser.add_argument("--no-pytest", action="store_true", help="skip the fault tests (killed processes etc.)")
    args = parser.parse_args()

    cache = tempfile.mkdtemp(prefix="mrisynth-robustness-cache-")
    os.environ["MRISYNTH_CACHE_DIR"] = cache  # never the user's slice cache
    sys.path.insert(0, str(TESTS))
    import torch

    torch.set_num_threads(1)
    import test_robustness as T  # noqa: N812 - the tests' tables

    start = time.monotonic()
    table_lines, n_rows, n_ok = run_tables(T)
    fault_lines, n_faults, n_faults_ok = ([], 0, 0) if args.no_pytest else run_fault_tests(T)
    seconds = time.monotonic() - start

    header = [
        "# Robustness: what was tried, what was expected, what was observed",
        "",
        "<!-- Generated by scripts/robustness_table.py from the tables in tests/test_robustness.py; do not edit by hand. -->",
        "",
        "Each row below is one scenario of `tests/test_robustness.py`, built in a fresh temporary folder",
        "(small synthetic cases, a tiny untrained model) and run through the `mrisynth` command line",
        "(`mrisynth.cli.main`). *Expected* is the exit code and a fragment that the message must contain;",
        "*observed* is what the command returned and printed (paths shown relative to the scenario's",
        "folder). Exit codes: 0 success, 1 bad input data, 2 bad usage. For every refusal the tests also",
        "check that stderr holds exactly one line, that no traceback is printed and that no output image",
        "is written; for accepted inputs, that the output overlays the inputs (same grid, affine, qform",
        "and sform codes; float32 in [0, 1]; 0 outside the brain mask).",
        "",
        "Regenerate with `.venv/bin/python scripts/robustness_table.py`; run the same checks as tests with",
        "`.venv/bin/python -m pytest -q tests/test_robustness.py`.",
        "",
        f"**{n_ok} of {n_rows} scenarios as expected"
        + ("" if args.no_pytest else f"; {n_faults_ok} of {n_faults} fault tests passed") + ".**",
        "",
    ]
    text = "\n".join(header + table_lines + fault_lines).rstrip() + "\n"
    if args.stdout:
        print(text, end="")
    else:
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(REPO)}: {n_ok}/{n_rows} scenarios and {n_faults_ok}/{n_faults} fault tests "
              f"as expected ({seconds:.0f} s)")
    return 0 if n_ok == n_rows and n_faults_ok == n_faults else 1


if __name__ == "__main__":
    sys.exit(main())
