"""Crash and resume: a 2-process FSDP2 run killed with SIGKILL mid-epoch, relaunched with autoresume.

:func:`crash_and_resume` runs the scenario and returns a summary dict; :func:`count_lost_and_repeated`
is the pure sample count it reports. Run as a module under the launcher
(``-m crash_helpers --sample-log PATH CONFIG.yaml k=v ...``) this file is ``composer_pike.train``
plus :class:`SampleLog`, which records the samples of every completed step.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from composer import Callback

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SIZES = (80, 60, 20)  # train samples per domain: d2's pass ends within the run, so a new pass starts in it
TOTAL = 16            # steps
SAVE_EVERY = 4        # steps between checkpoints
KILL_AFTER = 8        # kill once both ranks completed a step past this checkpoint that is not a checkpoint step
SCENARIO = 'sigkill_mid_epoch_autoresume_fsdp2_2proc'
TIMEOUT = 420         # seconds for any one wait on a launch (about 20 s idle; up to 2 min on 2 busy cores)

Steps = Mapping[int, Sequence[tuple[int, int]]]  # step -> the global batch's (domain, sample_id) pairs


class SampleLog(Callback):
    """Appends ``{"step": t, "domain": [...], "sample_id": [...]}`` per completed step (1-based) to a per-rank file.

    ``path`` contains ``{rank}``. The batch is taken when it is drawn (the trainer later replaces
    ``state.batch`` with microbatches) and written once its optimizer step is done, so the file
    doubles as a progress report.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._batch: Optional[tuple[list[int], list[int]]] = None
        self._file: Optional[Any] = None

    def after_dataloader(self, state, logger) -> None:
        self._batch = (state.batch['domain'].tolist(), state.batch['sample_id'].tolist())

    def batch_end(self, state, logger) -> None:
        from composer.utils import dist
        if self._file is None:
            self._file = open(self.path.replace('{rank}', str(dist.get_global_rank())), 'a')
        domains, sample_ids = self._batch
        self._file.write(json.dumps({'step': int(state.timestamp.batch), 'domain': domains,
                                     'sample_id': sample_ids}) + '\n')
        self._file.flush()

    def close(self, state, logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ------------------------------------------------------------------------------------- counting


def domain_streams(steps: Steps) -> dict[int, list[int]]:
    """Each domain's sample ids in the order they were trained on (steps ascending, batch order within)."""
    streams: dict[int, list[int]] = {}
    for step in sorted(steps):
        for domain, sample_id in steps[step]:
            streams.setdefault(domain, []).append(sample_id)
    return streams


def count_lost_and_repeated(reference: Steps, stitched: Steps,
                            domain_sizes: Sequence[int]) -> dict[int, dict[str, int]]:
    """Samples lost and repeated within each domain's passes (epochs) of ``stitched``, relative to ``reference``.

    ``stitched`` is what the interrupted run trained on: its steps up to the checkpoint it resumed
    from, then the resumed run's. Each domain's stream (:func:`domain_streams`) is cut into passes
    of ``domain_sizes[k]`` consecutive draws. Per pass: ``repeated`` counts draws of a sample id
    already drawn earlier in the same pass of ``stitched``; ``lost`` counts ids the reference drew
    in that pass that ``stitched`` never drew in it. Returns ``{domain: {'lost': n, 'repeated': m}}``.
    """
    ref, got = domain_streams(reference), domain_streams(stitched)
    counts = {}
    for k in sorted(set(ref) | set(got)):
        size = domain_sizes[k]
        ref_k, got_k = ref.get(k, []), got.get(k, [])
        lost = repeated = 0
        for start in range(0, max(len(ref_k), len(got_k)), size):
            drawn = Counter(got_k[start:start + size])
            repeated += sum(drawn.values()) - len(drawn)
            lost += len(set(ref_k[start:start + size]) - set(drawn))
        counts[k] = {'lost': lost, 'repeated': repeated}
    return counts


# ------------------------------------------------------------------------------------- launches


def read_jsonl(path: Path, start: int = 0, end: Optional[int] = None) -> list[dict]:
    """The complete JSON lines of ``path`` between byte offsets ``start`` and ``end`` (a killed writer may
    leave a partial last line: it is skipped)."""
    if not path.exists():
        return []
    with open(path, 'rb') as f:
        f.seek(start)
        data = f.read() if end is None else f.read(end - start)
    return [json.loads(line) for line in data.split(b'\n') if line.endswith(b'}')]


def global_steps(out: Path, starts: Sequence[int] = (0, 0), ends: Sequence[Optional[int]] = (None, None)) -> dict:
    """step -> the global batch (rank 0's slice, then rank 1's) from the two ranks' sample logs."""
    ranks = [{r['step']: list(zip(r['domain'], r['sample_id']))
              for r in read_jsonl(out / f'samples-rank{rank}.jsonl', starts[rank], ends[rank])} for rank in (0, 1)]
    return {step: ranks[0][step] + ranks[1][step] for step in sorted(set(ranks[0]) & set(ranks[1]))}


def weight_series(path: Path, start: int = 0, end: Optional[int] = None) -> dict[str, list[tuple[int, float]]]:
    """``pike/weight/<domain>`` -> [(step, weight)] from a per-rank metrics file."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_jsonl(path, start, end):
        for name, value in record.items():
            if name.startswith('pike/weight/'):
                series.setdefault(name, []).append((record['step'], value))
    return series


def completed_step(out: Path, rank: int) -> int:
    records = read_jsonl(out / f'samples-rank{rank}.jsonl')
    return records[-1]['step'] if records else 0


def streaming_shm(shm_dir: Path) -> list[str]:
    """Streaming's shared-memory segments in ``shm_dir`` (named ``<6-digit prefix>_<name>``)."""
    return sorted(name for name in os.listdir(shm_dir) if re.fullmatch(r'\d{6}_\w+', name))


def private_shm_command(command: list[str], shm_dir: Optional[Path]) -> list[str]:
    """``command`` with ``shm_dir`` mounted as its /dev/shm in a private mount namespace, so its launches
    share one /dev/shm that this process can list (and no other job on the machine sees); as is for None."""
    if shm_dir is None:
        return command
    return ['unshare', '--mount', '--propagation', 'private', 'sh', '-c',
            f'mount --bind {shm_dir} /dev/shm && exec "$@"', 'sh', *command]


class Launch:
    """`composer -n 2 -m crash_helpers ...` in its own process group (so that one signal reaches every rank)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        with open(log, 'w') as f:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.log = log

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGSTOP the group and return once the launcher and all its descendants are stopped."""
        import psutil
        self.signal(signal.SIGSTOP)
        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return

        def stopped(process: psutil.Process) -> bool:
            try:
                return process.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
            except psutil.NoSuchProcess:
                return True

        deadline = time.monotonic() + 60
        while not all(stopped(p) for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError('the launch did not stop within 60 s of SIGSTOP')
            time.sleep(0.01)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            raise AssertionError(f'launch did not finish in {timeout} s:\n{tails(self.log.parent)}') from None


def tails(out: Path, chars: int = 3000) -> str:
    return '\n'.join(f'--- {p.name}\n{p.read_text(errors="replace")[-chars:]}'
                     for p in sorted(out.glob('*.log')) + sorted(out.glob('rank*.std*')))


def kill_mid_epoch(launch: Launch, out: Path, ckpt: Path) -> int:
    """SIGKILL the whole launch (launcher and both ranks) once each rank has completed a step after
    checkpoint ``KILL_AFTER`` that is not a checkpoint step; returns the last step both ranks completed.

    Progress is polled from the sample logs. The process group is stopped (SIGSTOP) before the check,
    so the step read is the step it is killed at; a position that does not qualify (a rank at a
    checkpoint step may be writing it) is let go on (SIGCONT).
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        if launch.proc.poll() is not None:
            raise AssertionError(f'the run ended (exit {launch.proc.returncode}) before it could be killed:\n'
                                 f'{tails(out)}')
        if time.monotonic() > deadline:
            launch.signal(signal.SIGKILL)
            raise AssertionError(f'no step after {KILL_AFTER} in {TIMEOUT} s:\n{tails(out)}')
        if min(completed_step(out, r) for r in (0, 1)) > KILL_AFTER:
            launch.stop()
            done = [completed_step(out, r) for r in (0, 1)]
            if all(step % SAVE_EVERY for step in done) and (ckpt / 'latest-rank0.pt').exists():
                launch.signal(signal.SIGKILL)
                launch.proc.wait(timeout=60)
                return min(done)
            launch.signal(signal.SIGCONT)
        time.sleep(0.02)


def checkpoint_step(ckpt: Path) -> int:
    """The step of the checkpoint ``latest-rank0.pt`` points at (``ep0-ba8`` -> 8)."""
    return int(re.search(r'-ba(\d+)', os.readlink(ckpt / 'latest-rank0.pt')).group(1))


# ------------------------------------------------------------------------------------- the scenario


@contextlib.contextmanager
def moto_s3(workdir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A moto S3 server on 127.0.0.1 holding the scenario's data: yields (manifest URL, environment for the ranks)."""
    from s3_faults import S3_TEST_ENV, moto_server, s3_client
    from test_data import upload_tree
    from test_train import write_manifest

    with moto_server() as endpoint_url:
        client = s3_client(endpoint_url)
        client.create_bucket(Bucket='pike-crash')
        upload_tree(client, write_manifest(workdir / 'data', sizes=SIZES), 'pike-crash', 'data')
        yield 's3://pike-crash/data', {'S3_ENDPOINT_URL': endpoint_url, **S3_TEST_ENV}


def crash_and_resume(workdir: Path, private_shm: bool = True) -> dict[str, Any]:
    """Kill a 2-process FSDP2 run with SIGKILL mid-epoch, relaunch it, and compare with an uninterrupted run.

    The yaml is the multi-node one moved to CPU and shrunk: data streamed from S3 (a moto server
    started here) into a local cache, sharded checkpoints, autoresume. The uninterrupted run goes
    alongside the one that is killed, each with its own /dev/shm and cache. With ``private_shm``
    the killed run and its relaunch share one private /dev/shm (``unshare``, needs root), listed
    in between: ``stale_shm_entries`` is what the kill left there. Returns ``{"scenario",
    "survived", "samples_lost", "samples_repeated"}`` plus details; ``failures`` lists every
    check that did not hold (``survived`` is true when there are none). ``workdir/crash.json``
    records where the run was killed, for :func:`judge`.
    """
    started = time.monotonic()
    workdir = Path(workdir)
    try:
        with moto_s3(workdir) as (manifest, s3_env):
            crash = run_crash(workdir, manifest, s3_env, private_shm)
        result = judge(workdir, crash)
    except AssertionError as error:  # the run could not be killed where it had to be, or a launch hung
        result = {'scenario': SCENARIO, 'survived': False, 'samples_lost': None, 'samples_repeated': None,
                  'failures': [str(error)]}
    return {**result, 'wall_s': round(time.monotonic() - started, 1)}


def run_crash(workdir: Path, manifest: str, s3_env: dict[str, str], private_shm: bool) -> dict[str, Any]:
    """Start the uninterrupted and the doomed run together, kill the doomed one, relaunch it; wait for all.

    Returns (and writes to ``workdir/crash.json``) the steps killed after and resumed from, the
    byte offsets where the relaunch's lines start in the appended per-rank logs, the stale
    shared-memory names and the failures of the launches.
    """
    from launch_helpers import free_port
    from test_train import CPU_FSDP2, TINY, launcher_env

    yaml = os.path.join(REPO, 'yamls', 'multi_node.yaml')
    # Short TMPDIRs: DataLoader workers bind AF_UNIX sockets there (at most 107 bytes of path), and
    # pytest's tmp_path is too deep for that.
    tmp_dirs = {name: tempfile.mkdtemp(prefix=f'pike-{name}-') for name in ('uninterrupted', 'killed', 'relaunch')}

    def prepare(name: str) -> tuple[list[str], dict[str, str], Path, Optional[Path]]:
        out = workdir / name
        out.mkdir(parents=True)
        shm = workdir / f'shm-{name}' if private_shm else None
        if shm:
            shm.mkdir()
        overrides = [*TINY, *CPU_FSDP2, f'data.manifest={manifest}', f'data.cache_root={out}/cache',
                     f'run_dir={out}', 'run_name=crash-resume', 'model.n_layers=2',
                     f'trainer.max_duration={TOTAL}ba', f'trainer.eval_interval={TOTAL}ba',
                     f'trainer.save_folder={out}/ckpt', f'trainer.save_interval={SAVE_EVERY}ba',
                     'trainer.autoresume=true', f'trainer.log_file={out}/metrics-rank{{rank}}.jsonl']
        command = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', '--master_port', str(free_port()),
                   '--stdout', str(out / 'rank{rank}.stdout'), '--stderr', str(out / 'rank{rank}.stderr'),
                   '-m', 'crash_helpers', '--sample-log', str(out / 'samples-rank{rank}.jsonl'), yaml, *overrides]
        env = launcher_env(tmp_dirs[name], TESTS)
        for key in ('AWS_PROFILE', 'AWS_SESSION_TOKEN'):
            env.pop(key, None)
        return private_shm_command(command, shm), {**env, **s3_env}, out, shm

    ref_command, ref_env, ref_out, _ = prepare('uninterrupted')
    command, env, out, shm = prepare('killed')
    launches = [Launch(ref_command, ref_env, ref_out / 'launch.log'), Launch(command, env, out / 'launch-1.log')]
    failures = []
    try:
        killed_after = kill_mid_epoch(launches[1], out, out / 'ckpt')
        crash = {'killed_after': killed_after, 'resumed_from': checkpoint_step(out / 'ckpt'),
                 'offsets': {name: [os.path.getsize(out / f'{name}-rank{r}.jsonl') for r in (0, 1)]
                             for name in ('samples', 'metrics')},
                 'stale_shm': streaming_shm(shm) if shm else None}
        # The same command again, as a new job on the same host would run it: a fresh TMPDIR, where
        # streaming's lock files no longer mark the killed run's shared-memory names as taken.
        launches.append(Launch(command, {**env, 'TMPDIR': tmp_dirs['relaunch']}, out / 'launch-2.log'))
        if launches[2].wait() != 0:
            failures.append(f'the relaunch failed:\n{tails(out)}')
        if launches[0].wait() != 0:
            failures.append(f'the uninterrupted run failed:\n{tails(ref_out)}')
    finally:
        for launch in launches:
            if launch.proc.poll() is None:
                launch.signal(signal.SIGKILL)
        for tmp in tmp_dirs.values():
            shutil.rmtree(tmp, ignore_errors=True)
    if shm:
        if not crash['stale_shm']:
            failures.append(f'SIGKILL left no shared memory in {shm} (nothing stale to clean)')
        if streaming_shm(shm):
            failures.append(f'the relaunch left shared memory behind: {streaming_shm(shm)}')
    crash['failures'] = failures
    (workdir / 'crash.json').write_text(json.dumps(crash, indent=1))
    return crash


def judge(workdir: Path, crash: dict[str, Any]) -> dict[str, Any]:
    """Compare the killed run (before the kill, then the relaunch) with the uninterrupted one: the summary dict."""
    failures = list(crash['failures'])

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    ref_out, out = workdir / 'uninterrupted', workdir / 'killed'
    killed_after, resumed_from, offsets = crash['killed_after'], crash['resumed_from'], crash['offsets']
    full = global_steps(ref_out)
    before = global_steps(out, ends=offsets['samples'])
    after = global_steps(out, starts=offsets['samples'])
    check(resumed_from < killed_after and resumed_from % SAVE_EVERY == 0,
          f'killed after step {killed_after}, latest checkpoint at step {resumed_from}')
    check(sorted(full) == list(range(1, TOTAL + 1)), f'the uninterrupted run completed steps {sorted(full)}')
    check(sorted(before) == list(range(1, killed_after + 1)), f'before the kill: steps {sorted(before)}')
    check(sorted(after) == list(range(resumed_from + 1, TOTAL + 1)),
          f'the relaunch did not continue from step {resumed_from}: steps {sorted(after)}')
    check(all(before[s] == full.get(s) for s in before), 'the killed run drew other samples before the kill')
    check(all(after[s] == full.get(s) for s in after), 'the relaunch drew other samples than the uninterrupted run')
    stitched = {**{s: b for s, b in before.items() if s <= resumed_from}, **after}
    counts = count_lost_and_repeated(full, stitched, SIZES)

    trajectories = []
    for rank in (0, 1):
        name = f'metrics-rank{rank}.jsonl'
        ref_w = weight_series(ref_out / name)
        pre = weight_series(out / name, end=offsets['metrics'][rank])
        post = weight_series(out / name, start=offsets['metrics'][rank])
        for key in sorted(ref_w):
            check([(s, w) for s, w in pre.get(key, []) if s <= resumed_from] + post.get(key, []) == ref_w[key],
                  f'rank {rank}: {key} differs from the uninterrupted run')
        trajectories.append(ref_w)
    check(bool(trajectories[0]) and trajectories[0] == trajectories[1], 'the ranks logged different PiKE weights')
    steps = [s for s, _ in trajectories[0].get('pike/weight/d0', [])]
    vectors = list(zip(*([w for _, w in series] for series in trajectories[0].values())))  # per update
    before_ckpt = [w for s, w in zip(steps, vectors) if s <= resumed_from]
    after_ckpt = [w for s, w in zip(steps, vectors) if s > resumed_from]
    check(len(set(before_ckpt)) > 1 and bool(after_ckpt) and after_ckpt[-1] != before_ckpt[-1],
          f'PiKE did not change the weights both before and after the checkpoint (updates at steps {steps})')
    lost = sum(c['lost'] for c in counts.values())
    repeated = sum(c['repeated'] for c in counts.values())
    check(lost == 0 and repeated == 0, f'samples lost {lost}, repeated {repeated}: {counts}')
    stale = crash['stale_shm']
    return {'scenario': SCENARIO, 'survived': not failures, 'samples_lost': lost, 'samples_repeated': repeated,
            'killed_after_step': killed_after, 'resumed_from_step': resumed_from, 'total_steps': TOTAL,
            'per_domain': counts, 'weight_updates': steps,
            'domain_passes': {k: len(v) / SIZES[k] for k, v in domain_streams(full).items()},
            'stale_shm_entries': None if stale is None else len(stale), 'failures': failures}


def main(argv: list[str]) -> None:
    """``--sample-log PATH CONFIG.yaml [key=value ...]``: composer_pike.train with a :class:`SampleLog`."""
    from composer_pike.train import load_config, train

    if len(argv) < 3 or argv[0] != '--sample-log':
        sys.exit('usage: python -m crash_helpers --sample-log PATH CONFIG.yaml [key=value ...]')
    train(load_config(argv[2], argv[3:]), callbacks=[SampleLog(argv[1])])


if __name__ == '__main__':
    main(sys.argv[1:])
