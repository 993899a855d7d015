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
    config_errors        every bad key/value of tests/test_train.py's BAD_OVERRIDES given to the
                         `composer_pike.train` CLI: exit code 2 and one stderr line naming the key,
                         no traceback; an unknown `pike_mixture` option under `llmfoundry train`
                         (where .venv-foundry exists) fails naming the option
    clean_end            `on_exhausted: stop` with a max_duration far beyond the data, under a plain
                         Composer Trainer with no callbacks, the `composer_pike.train` YAML entry
                         and `llmfoundry train` (where .venv-foundry exists): each must exit 0;
                         reports the seconds from its last training batch to its exit

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


FOUNDRY_PYTHON = REPO / ".venv-foundry" / "bin" / "python"


def config_errors(args: argparse.Namespace, scratch: Path) -> ScenarioResult:
    """Each bad override through the real CLI: exit code 2, one line naming the key, no traceback."""
    from test_train import BAD_OVERRIDES

    failures = []
    for override, key, hint in BAD_OVERRIDES:
        result = subprocess.run([sys.executable, "-m", "composer_pike.train", "yamls/demo_cpu.yaml", override,
                                 f"run_dir={scratch / 'run'}"], cwd=REPO, capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        if result.returncode != 2 or len(lines) != 1 or key not in lines[0] or hint not in lines[0]:
            failures.append(f"{override}: exit {result.returncode}, stderr {result.stderr.strip()[-300:]!r}")
    detail = f"{len(BAD_OVERRIDES) - len(failures)}/{len(BAD_OVERRIDES)} CLI cases named the key in one line"
    if FOUNDRY_PYTHON.exists():
        result = _foundry_train(scratch / "foundry-error", ["train_loader.num_wokers=2"], timeout=600)
        named = result.returncode != 0 and "train_loader.num_wokers: not an option" in result.stdout + result.stderr
        detail += f"; llmfoundry train with train_loader.num_wokers: {'named' if named else 'NOT named'}"
        if not named:
            failures.append(f"llmfoundry: exit {result.returncode}, {(result.stdout + result.stderr)[-300:]!r}")
    return ScenarioResult(not failures, detail, tuple(failures[:5]))


PLAIN_COMPOSER_STOP = """
import sys, torch
sys.path.insert(0, 'tests')
from composer import Trainer
from algorithm_worker import build_model
from test_train import write_manifest
from composer_pike.callbacks import JsonlLogger
from composer_pike.data import MixtureDataset, build_mixture_dataloader, sources_from_manifest
manifest = write_manifest(sys.argv[1] + '/data')
dataset = MixtureDataset(sources_from_manifest(manifest))
loader = build_mixture_dataloader(dataset, 8, on_exhausted='stop', num_workers=0)
model = build_model()
Trainer(model=model, train_dataloader=loader, max_duration='100000ba', device='cpu', progress_bar=False,
        loggers=[JsonlLogger(sys.argv[1] + '/metrics.jsonl')],
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3)).fit()
"""


def clean_end(args: argparse.Namespace, scratch: Path) -> ScenarioResult:
    """on_exhausted=stop far short of max_duration under three launchers: exit 0, seconds after the last batch."""
    from test_train import write_manifest

    runs = {
        "plain Composer": ([sys.executable, "-c", PLAIN_COMPOSER_STOP, str(scratch / "plain")], scratch / "plain"),
        "composer_pike.train": ([sys.executable, "-m", "composer_pike.train", "yamls/demo_cpu.yaml",
                                 f"data.manifest={write_manifest(str(scratch / 'yaml-data'))}", "data.on_exhausted=stop",
                                 "data.global_batch_size=8", "trainer.max_duration=100000ba",
                                 f"run_dir={scratch / 'yaml'}"], scratch / "yaml"),
    }
    failures, details = [], []
    for name, (command, workdir) in runs.items():
        workdir.mkdir(parents=True, exist_ok=True)
        outcome = _timed_until_exit(command, workdir / "metrics.jsonl")
        details.append(f"{name}: exit {outcome['returncode']}, {outcome['batches']} batches, "
                       f"{outcome['seconds_after_last_batch']:.1f} s after the last batch")
        if outcome["returncode"] != 0 or not 0 < outcome["batches"] < 100000:
            failures.append(f"{name}: {outcome}")
    if FOUNDRY_PYTHON.exists():
        outcome = _foundry_stop(scratch / "foundry")
        details.append(f"llmfoundry train: exit {outcome['returncode']}, {outcome['batches']} batches, "
                       f"{outcome['seconds_after_last_batch']:.1f} s after the last batch")
        if outcome["returncode"] != 0 or not 0 < outcome["batches"] < 100000:
            failures.append(f"llmfoundry train: {outcome}")
    else:
        details.append("llmfoundry train: not run (no .venv-foundry; `make foundry-venv`)")
    return ScenarioResult(not failures, "; ".join(details), tuple(failures))


def _timed_until_exit(command: list[str], metrics: Path, timeout: float = 900) -> dict:
    """Run ``command``, noting when each new ``loss/train/total`` line reaches ``metrics``; the
    seconds from the last one to the process's exit (polled every 0.1 s)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    batches, last_batch_at, deadline = 0, time.perf_counter(), time.perf_counter() + timeout
    while process.poll() is None and time.perf_counter() < deadline:
        seen = metrics.read_text().count('"loss/train/total"') if metrics.exists() else 0
        if seen > batches:
            batches, last_batch_at = seen, time.perf_counter()
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
    exited_at = time.perf_counter()
    stderr = process.stderr.read() if process.stderr else ""
    final = metrics.read_text().count('"loss/train/total"') if metrics.exists() else 0
    if final > batches:  # written in the last poll interval
        batches, last_batch_at = final, exited_at
    return {"returncode": process.wait(), "batches": batches,
            "seconds_after_last_batch": exited_at - last_batch_at, "stderr_tail": stderr[-500:]}


def _foundry_data(scratch: Path) -> Path:
    """The demo corpus at 0.1 MB as a pike-prep manifest, and the byte tokenizer, for yamls/llmfoundry/pike.yaml."""
    script = ("import sys; from streaming_prep.demo import build_demo_corpus; from streaming_prep.pipeline import "
              "prepare; from transformers import ByT5Tokenizer; root = sys.argv[1]; "
              "prepare(build_demo_corpus(root + '/raw', 0.1), root + '/data', seq_len=128); "
              "ByT5Tokenizer().save_pretrained(root + '/byte-tokenizer')")
    subprocess.run([str(FOUNDRY_PYTHON), "-c", script, str(scratch)], cwd=REPO, check=True, capture_output=True)
    return scratch


def _foundry_command(scratch: Path, yaml: Path, overrides: list[str]) -> list[str]:
    return [str(FOUNDRY_PYTHON), "-m", "llmfoundry.cli.cli", "train", str(yaml), f"variables.data={scratch / 'data'}",
            f"variables.tokenizer={scratch / 'byte-tokenizer'}", f"variables.run_dir={scratch / 'run'}",
            f"loggers.pike_jsonl.path={scratch / 'metrics.jsonl'}", *overrides]


def _foundry_train(scratch: Path, overrides: list[str], timeout: float) -> subprocess.CompletedProcess:
    scratch = _foundry_data(scratch)
    return subprocess.run(_foundry_command(scratch, REPO / "yamls" / "llmfoundry" / "pike.yaml", overrides), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _foundry_stop(scratch: Path) -> dict:
    """yamls/llmfoundry/pike.yaml without its callbacks, on_exhausted=stop, max_duration 100000ba."""
    from omegaconf import OmegaConf

    scratch = _foundry_data(scratch)
    config = OmegaConf.load(REPO / "yamls" / "llmfoundry" / "pike.yaml")
    del config["callbacks"]
    yaml = scratch / "stop.yaml"
    OmegaConf.save(config, yaml)
    overrides = ["train_loader.on_exhausted=stop", "max_duration=100000ba", "save_interval=100000ba"]
    return _timed_until_exit(_foundry_command(scratch, yaml, overrides), scratch / "metrics.jsonl")


SCENARIOS = [
    Scenario("hostile_input", hostile_input),
    Scenario("crash_resume", crash_resume),
    Scenario("object_store_faults", object_store_faults),
    Scenario("concurrent_jobs", concurrent_jobs),
    Scenario("config_errors", config_errors),
    Scenario("clean_end", clean_end),
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
