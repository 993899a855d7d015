"""Fault matrix: runs every reliability scenario in SCENARIOS and summarises what survived.

Each scenario is one entry in the SCENARIOS table: a name and a function that runs it in a
scratch directory and returns a ScenarioResult. Scenarios that involve training report the
samples they lost and repeated; the others leave those as None. Planned entries (crash and
resume under SIGKILL, object-store fault injection, concurrent runs) are added to the table
by the work that builds them; until then they are neither run nor counted.

Prints one line per scenario, then a final line that is a JSON object:

    {"scenarios": n, "survived": s, "samples_lost": L, "samples_repeated": R, "fuzz_cases": f}

samples_lost / samples_repeated are sums over the scenarios that count samples, null when none
of the scenarios run does; fuzz_cases is the number of hostile inputs pike-prep was run on.

    python benchmarks/fault_matrix.py [--only NAME ...] [--fuzz-cases 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streaming_prep.hostile import check_file_case, check_named_case, random_case, write_named_cases


@dataclass(frozen=True)
class ScenarioResult:
    """survived: every check of the scenario held. failures: what did not (at most a few)."""

    survived: bool
    detail: str
    failures: tuple[str, ...] = ()
    fuzz_cases: int = 0
    samples_lost: int | None = None  # None: the scenario does not train, so counts no samples
    samples_repeated: int | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[argparse.Namespace, Path], ScenarioResult]  # (options, scratch directory)


def hostile_input(args: argparse.Namespace, scratch: Path) -> ScenarioResult:
    """pike-prep on every hand-made hostile input under each decode policy it lists, then on
    args.fuzz_cases randomly mutated files (streaming_prep.hostile.random_case, seeded)."""
    failures = []
    cases = write_named_cases(scratch / "inputs", huge=True)
    runs = [(name, case, policy) for name, case in cases.items() for policy in case.expected]
    for number, (name, case, policy) in enumerate(runs):
        violation = check_named_case(case, policy, str(scratch / f"out-{number}"))
        if violation:
            failures.append(f"{name} [{policy}]: {violation}")
    rng = random.Random(args.seed)
    for number in range(args.fuzz_cases):
        kind, data, policy = random_case(rng)
        violation = check_file_case(kind, data, policy)
        if violation:
            failures.append(f"random case {number} ({kind}, {policy}, {len(data)} bytes): {violation}")
    detail = f"{len(runs)} hand-made runs ({len(cases)} inputs), {args.fuzz_cases} random mutated files"
    return ScenarioResult(not failures, detail, tuple(failures[:5]), fuzz_cases=len(runs) + args.fuzz_cases)


SCENARIOS = [
    Scenario("hostile_input", hostile_input),
]


def summary(results: dict[str, ScenarioResult]) -> dict:
    """The final JSON object over the scenarios that ran."""

    def total(field: str) -> int | None:
        counted = [getattr(result, field) for result in results.values() if getattr(result, field) is not None]
        return sum(counted) if counted else None

    return {
        "scenarios": len(results),
        "survived": sum(result.survived for result in results.values()),
        "samples_lost": total("samples_lost"),
        "samples_repeated": total("samples_repeated"),
        "fuzz_cases": sum(result.fuzz_cases for result in results.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=[scenario.name for scenario in SCENARIOS],
                        help="run only these scenarios")
    parser.add_argument("--fuzz-cases", type=int, default=500, help="random mutated files for hostile_input")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {}
    for scenario in SCENARIOS:
        if args.only and scenario.name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"pike-fault-{scenario.name}-") as scratch:
            start = time.perf_counter()
            result = scenario.run(args, Path(scratch))
        results[scenario.name] = result
        status = "survived" if result.survived else "FAILED"
        print(f"{scenario.name}: {status} in {time.perf_counter() - start:.1f} s: {result.detail}")
        for failure in result.failures:
            print(f"  {failure}")
    print(f"load average (1 min) after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(json.dumps(summary(results)))


if __name__ == "__main__":
    main()
