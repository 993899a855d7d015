"""Fault matrix: runs every reliability scenario in SCENARIOS and summarises what survived.

Each scenario is one entry in the SCENARIOS table: a name and a function that runs it in a
scratch directory and returns a ScenarioResult. Scenarios that involve training report the
samples they lost and repeated; the others leave those as None. The scenarios (tests/ holds
their machinery, shared with the test suite):

    hostile_input        pike-prep on hand-made and randomly mutated hostile files
    crash_resume         a 2-process FSDP2 run SIGKILLed mid-epoch, relaunched with autoresume
                         (tests/crash_helpers.py), against a run that was never killed
    object_store_faults  the mixture loader reading from moto through a proxy that answers GETs
                         with 500/503, slowly, with dropped connections and flipped bytes (0 and 2
                         workers), against a fault-free read; then a shard answered 503 for good
                         (tests/s3_faults.py)
    concurrent_jobs      pytest's tests of two processes building mixtures at once on one
                         /dev/shm, of shared-memory names taken by another process, and of a
                         job starting beside a running one (only stale segments are cleaned)

Prints one line per scenario, then a final line that is a JSON object:

    {"scenarios": n, "survived": s, "samples_lost": L, "samples_repeated": R, "fuzz_cases": f}

samples_lost / samples_repeated are sums over the scenarios that count samples, null when none
of the scenarios run does; fuzz_cases is the number of hostile inputs pike-prep was run on.

    python benchmarks/fault_matrix.py [--only NAME ...] [--fuzz-cases 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def crash_resume(args: argparse.Namespace, scratch: Path) -> ScenarioResult:
    """tests/crash_helpers.py's SIGKILL-and-autoresume run (private /dev/shm where unshare works)."""
    from crash_helpers import crash_and_resume
    from test_data import private_shm_available

    result = crash_and_resume(scratch, private_shm=private_shm_available())
    detail = (f"killed after step {result.get('killed_after_step')}, resumed from step "
              f"{result.get('resumed_from_step')} of {result.get('total_steps')}, stale shared-memory "
              f"entries {result.get('stale_shm_entries')}, {result['wall_s']} s")
    return ScenarioResult(result["survived"], detail, tuple(f[:500] for f in result["failures"][:5]),
                          samples_lost=result["samples_lost"], samples_repeated=result["samples_repeated"])


@contextlib.contextmanager
def dummy_credentials() -> Iterator[None]:
    """The moto server's dummy AWS credentials in os.environ for the block (streaming's clients read them)."""
    from s3_faults import S3_TEST_ENV

    saved = {name: os.environ.get(name) for name in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def object_store_faults(args: argparse.Namespace, scratch: Path) -> ScenarioResult:
    """Flaky reads with 0 and 2 workers (samples lost/repeated against the fault-free read), then a
    shard that stays unavailable (must end the read that needs it with an error naming domain, shard
    and remote; a read that never reaches it must yield the fault-free batches)."""
    from crash_helpers import count_lost_and_repeated
    from s3_faults import SIZES, flaky_read, moto_server, s3_client, unavailable_read

    failures, lost, repeated, details = [], 0, 0, []
    with moto_server() as endpoint, dummy_credentials():
        client = s3_client(endpoint)
        for workers in (0, 2):
            result = flaky_read(scratch / f"flaky-{workers}", client, endpoint, workers)
            outcome, counts = result["outcome"], dict(result["counts"])
            details.append(f"{workers} workers: {counts}")
            if "value" not in outcome:
                failures.append(f"flaky read, {workers} workers: {outcome}")
                continue
            steps = {s: batch for s, batch in enumerate(outcome["value"], start=1)}
            expected = {s: batch for s, batch in enumerate(result["expected"], start=1)}
            per_domain = count_lost_and_repeated(expected, steps, SIZES)
            lost += sum(c["lost"] for c in per_domain.values())
            repeated += sum(c["repeated"] for c in per_domain.values())
            if steps != expected:
                failures.append(f"flaky read, {workers} workers: other samples than the fault-free read")
        result = unavailable_read(scratch / "unavailable", client, endpoint, needed=True)
        error = str(result["outcome"].get("error", ""))
        named = all(part in error for part in ("domain 'forums'", result["shard"], result["remote"]))
        details.append(f"unavailable shard: {dict(result['counts'])}")
        if not named or result["cached"] or isinstance(result["outcome"].get("error"), AssertionError):
            failures.append(f"unavailable shard: outcome {result['outcome']}, cached {result['cached']}")
        result = unavailable_read(scratch / "unneeded", client, endpoint, needed=False)
        details.append(f"unavailable shard never read: {dict(result['counts'])}")
        if result["outcome"].get("value") != result["expected"] or not any(result["shard"] in e for e in result["prefetch_failed"]):
            failures.append(f"unavailable shard never read: outcome {result['outcome']}")
    return ScenarioResult(not failures, "; ".join(details), tuple(failures),
                          samples_lost=lost, samples_repeated=repeated)


CONCURRENT_TESTS = ("tests/test_data.py::test_two_processes_building_mixtures_at_the_same_time_do_not_collide",
                    "tests/test_data.py::test_shared_memory_names_taken_by_another_process_are_retried",
                    "tests/test_data.py::test_a_new_job_cleans_only_the_shared_memory_no_process_maps")


def concurrent_jobs(args: argparse.Namespace, scratch: Path) -> ScenarioResult:
    """The concurrency tests of tests/test_data.py, in a pytest subprocess."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CONCURRENT_TESTS]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    last = (result.stdout.strip().splitlines() or [""])[-1]
    failures = () if result.returncode == 0 else (result.stdout[-1500:],)
    return ScenarioResult(result.returncode == 0, f"pytest: {last}", failures)


SCENARIOS = [
    Scenario("hostile_input", hostile_input),
    Scenario("crash_resume", crash_resume),
    Scenario("object_store_faults", object_store_faults),
    Scenario("concurrent_jobs", concurrent_jobs),
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
