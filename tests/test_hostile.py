"""Hostile input (issue 6, item 4): pike-prep on fuzzed and hand-made inputs, domain names that
would escape the output directory, MDS datasets with pickle columns, and credentials that must
never be printed or stored.

The contract checked everywhere (streaming_prep.hostile): pike-prep converts, or exits with code 2
and one line on stderr naming the domain and file; it never raises or prints a traceback.
Hypothesis budgets are small (the file takes about 35 s of CPU; most of its wall time is the two
subprocess runs starting Python with torch); benchmarks/fault_matrix.py runs more cases.
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming_prep.cli import OPTION_KEYS
from streaming_prep.errors import safe_line
from streaming_prep.hostile import (
    DOMAIN,
    ERROR_PREFIX,
    HUGE_LINE_BYTES,
    KINDS,
    check_file_case,
    check_named_case,
    contract_violation,
    convert,
    encode_corpus,
    mutate,
    run_main,
    write_named_cases,
)
from streaming_prep.pipeline import MAX_DOMAIN_NAME_CHARS, is_valid_domain_name
from streaming_prep.readers import DECODE_POLICIES

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = "a document of plain text, long enough to fill a few samples. " * 3


def manifest_entry(out: str | Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())["domains"][DOMAIN]


@pytest.fixture(scope="module")
def good_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("good") / "good.jsonl"
    path.write_bytes(encode_corpus("jsonl", [TEXT] * 5))
    return str(path)


# ---------------------------------------------------------------- hand-made hostile files


def test_hand_made_hostile_inputs(tmp_path: Path):
    """Every hand-made case under each policy it lists converts or fails with its expected one-line error."""
    cases = write_named_cases(tmp_path / "in", huge=False)
    assert len(cases) > 50
    runs = [(name, case, policy) for name, case in cases.items() for policy in case.expected]
    failures = {}
    for number, (name, case, policy) in enumerate(runs):
        violation = check_named_case(case, policy, str(tmp_path / f"out-{number}"))
        if violation:
            failures[f"{name} [{policy}]"] = violation
    assert failures == {}


def test_huge_lines_without_newline(tmp_path: Path):
    """20 MB in one line: a text document and a JSONL record convert whole; a garbage line fails
    with a short message."""
    cases = write_named_cases(tmp_path / "in", huge=True)
    for name in ("huge_line.txt", "huge_line.jsonl"):
        out = tmp_path / f"out-{name}"
        assert check_named_case(cases[name], "replace", str(out)) is None
        assert manifest_entry(out)["bytes"] == HUGE_LINE_BYTES
    outcome = convert(cases["huge_garbage_line.jsonl"].path, str(tmp_path / "out-garbage"), seq_len=4096)
    assert contract_violation(outcome, file=cases["huge_garbage_line.jsonl"].path) is None
    assert outcome.code == 2 and len(outcome.stderr) < 500


def test_odd_names_and_symlink_loops_read_every_file_once(tmp_path: Path):
    cases = write_named_cases(tmp_path / "in", huge=False)
    expected_documents = {"odd_file_names": 12, "symlink_loop_dir": 1, "symlink_loop_glob": 1}
    for name, documents in expected_documents.items():
        out = tmp_path / f"out-{name}"
        assert check_named_case(cases[name], "fail", str(out)) is None
        entry = manifest_entry(out)
        assert entry["documents"] == documents, name
        assert len({source["path"] for source in entry["sources"]}) == documents
    names = {Path(source["path"]).name for source in manifest_entry(tmp_path / "out-odd_file_names")["sources"]}
    assert {"new\nline.txt", os.fsdecode(b"caf\xe9.txt"), "*star?.txt"} <= names


def test_decode_policies_are_reported_on_the_summary_line(tmp_path: Path):
    cases = write_named_cases(tmp_path / "in", huge=False)
    outcome = convert(cases["utf16_no_bom.txt"].path, str(tmp_path / "replace"), "replace")
    nuls = Path(cases["utf16_no_bom.txt"].path).read_bytes().count(0)  # one per ASCII character
    assert manifest_entry(tmp_path / "replace")["decode_errors"]["replaced_chars"] == nuls > 0
    assert f"; {nuls} invalid characters replaced by U+FFFD" in outcome.stdout
    path = tmp_path / "two.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n' + encode_corpus("jsonl", [TEXT]))
    outcome = convert(str(path), str(tmp_path / "skip"), "skip")
    assert outcome.code == 0 and "; 1 documents with invalid text skipped" in outcome.stdout


# ---------------------------------------------------------------- fuzzing


@FUZZ
@given(
    kind=st.sampled_from(KINDS),
    texts=st.lists(st.text(max_size=200), max_size=4),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 64), st.binary(max_size=32)), max_size=3),
    policy=st.sampled_from(DECODE_POLICIES),
    seq_len=st.sampled_from([2, 8, 64]),
)
def test_fuzz_mutated_files(kind: str, texts: list[str], edits: list, policy: str, seq_len: int):
    assert check_file_case(kind, mutate(encode_corpus(kind, texts), edits), policy, seq_len) is None


@FUZZ
@given(kind=st.sampled_from(KINDS), data=st.binary(max_size=4096), policy=st.sampled_from(DECODE_POLICIES))
def test_fuzz_random_bytes(kind: str, data: bytes, policy: str):
    assert check_file_case(kind, data, policy) is None


ORACLE_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def decode_oracle(raw: bytes) -> tuple[str, int, bool]:
    """(document under 'replace', characters replaced, whether the bytes are clean text), from
    Python's codecs: a byte-order mark picks the codec, each decode error and each NUL is replaced."""
    codec = next((name for bom, name in ORACLE_BOMS if raw.startswith(bom)), "utf-8")
    errors = []

    def handler(err: UnicodeDecodeError) -> tuple[str, int]:
        errors.append(err.start)
        return "\ufffd", err.end

    codecs.register_error("pike-oracle", handler)
    text = raw.decode(codec, errors="pike-oracle")
    replaced = len(errors) + text.count("\0")
    return text.replace("\0", "\ufffd"), replaced, replaced == 0


@FUZZ
@given(
    text=st.text(min_size=1, max_size=300),
    codec=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be",
                           "latin-1", "cp1252", "shift_jis"]),
    policy=st.sampled_from(DECODE_POLICIES),
)
def test_fuzz_encodings_follow_the_decode_policy(text: str, codec: str, policy: str):
    """Clean text (UTF-8, or any UTF with a byte-order mark) converts exactly under every policy;
    anything else is replaced (and counted), skipped, or refused naming the file."""
    raw = text.encode(codec, errors="replace")
    document, replaced, clean = decode_oracle(raw)
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "doc.txt")
        Path(path).write_bytes(raw)
        outcome = convert(path, os.path.join(root, "out"), policy, seq_len=2)
        assert contract_violation(outcome, file=None if outcome.code == 0 else path) is None
        if not clean and policy == "skip":
            assert "no documents" in outcome.stderr
        elif not clean and policy == "fail":
            assert "invalid UTF-" in outcome.stderr or "NUL character at offset" in outcome.stderr
        elif document == "":  # a byte-order mark alone: one EOS token, less than a sample
            assert "fewer than seq_len 2" in outcome.stderr
        else:
            assert outcome.code == 0, outcome.stderr
            entry = manifest_entry(os.path.join(root, "out"))
            assert entry["bytes"] == len(document.encode("utf-8"))
            assert entry["decode_errors"]["replaced_chars"] == replaced


FLAGS = [f"--{key.replace('_', '-')}" for key in OPTION_KEYS if key not in ("out", "overwrite")]
ODD_VALUES = ["0", "-1", "1", "nan", "inf", "-inf", "1e999", "infmb", "64mb", "2**40", "zstd:99", "none", "", " ",
              "\n", "\x00", "byte", "xxh64,,none", "9" * 5000, "../..", "/"]
FLAG_VALUE = st.sampled_from(ODD_VALUES) | st.text(max_size=12) | st.integers(-(2**70), 2**70).map(str)


@FUZZ
@given(options=st.dictionaries(st.sampled_from(FLAGS), FLAG_VALUE, max_size=4), out_name=st.text(max_size=20))
def test_fuzz_cli_options(good_jsonl: str, options: dict[str, str], out_name: str):
    """Any option values (and any output name inside a scratch directory) convert or fail in one line."""
    with tempfile.TemporaryDirectory() as root:
        out = os.path.join(root, "out" + out_name.replace("/", "_").replace("\0", "_"))
        argv = ["--domain", f"{DOMAIN}={good_jsonl}", "--out", out]
        argv += [arg for flag, value in options.items() for arg in (flag, value)]
        assert contract_violation(run_main(argv), domain=None) is None


YAML_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(
    config=st.dictionaries(st.sampled_from([key for key in OPTION_KEYS if key != "out"] + ["unknown"]),
                           YAML_VALUE, max_size=4),
    domains=st.dictionaries(st.text(max_size=8) | st.integers(), st.just("GOOD") | YAML_VALUE, max_size=2)
    | YAML_VALUE,
)
def test_fuzz_yaml_config(good_jsonl: str, config: dict, domains):
    """Any YAML values for the config keys and the domains mapping convert or fail in one line."""
    if isinstance(domains, dict):
        domains = {name: good_jsonl if spec == "GOOD" else spec for name, spec in domains.items()}
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "prep.yaml"
        path.write_text(yaml.safe_dump({**config, "out": os.path.join(root, "out"), "domains": domains}))
        assert contract_violation(run_main(["--config", str(path)]), domain=None) is None


def test_subprocess_hostile_input_prints_one_line_and_no_traceback(tmp_path: Path):
    """The real entry point, in its own process (one run: starting one takes seconds), on a
    truncated gzip whose name holds a newline and an undecodable byte."""
    data = encode_corpus("jsonl.gz", [TEXT] * 50)
    path = tmp_path / os.fsdecode(b"odd\nname\xe9.jsonl.gz")
    path.write_bytes(data[: len(data) // 2])
    result = subprocess.run(
        [sys.executable, "-m", "streaming_prep", "--domain", f"{DOMAIN}={path}", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, errors="backslashreplace", cwd=REPO, timeout=300,
    )
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr == (f"{ERROR_PREFIX}domain {DOMAIN!r}: {safe_line(str(path))}: cannot read: "
                             "Compressed file ended before the end-of-stream marker was reached\n")


# ---------------------------------------------------------------- domain names


ESCAPING_NAMES = ["../x", "..", ".", "a/b", "a/../../b", "/abs", "/", "", "x\0y", "a" * (MAX_DOMAIN_NAME_CHARS + 1),
                  ".hidden", "-flag", "a\\b", "~", "~root", "a\nb", "manifest.json", "naïve", "a b", "C:"]


@pytest.mark.parametrize("form", ["flag", "yaml"])
@pytest.mark.parametrize("name", ESCAPING_NAMES, ids=repr)
def test_domain_names_that_could_escape_the_output_are_rejected(tmp_path: Path, good_jsonl: str, form: str,
                                                                name: str):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    if form == "flag":
        argv = [f"--domain={name}={good_jsonl}", "--out", str(out)]  # "--domain", "-x=..." would read as an option
    else:
        (tmp_path / "prep.yaml").write_text(yaml.safe_dump({"out": str(out), "domains": {name: good_jsonl}}))
        argv = ["--config", str(tmp_path / "prep.yaml")]
    outcome = run_main(argv)
    assert contract_violation(outcome, domain=None) is None and outcome.code == 2
    if form == "flag" and name == "":
        assert f"--domain '={good_jsonl}': expected NAME=PATH" in outcome.stderr
    else:
        assert f"invalid domain name {safe_line(repr(name))}" in outcome.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["work", "prep.yaml"][: 1 + (form == "yaml")])


def test_longest_domain_name_converts(tmp_path: Path, good_jsonl: str):
    name = "d" * MAX_DOMAIN_NAME_CHARS
    outcome = run_main(["--domain", f"{name}={good_jsonl}", "--out", str(tmp_path / "out"), "--seq-len", "8"])
    assert outcome.code == 0, outcome.stderr
    assert (tmp_path / "out" / name / "train" / "index.json").is_file()


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=12) | st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True))
def test_valid_domain_names_stay_directly_under_the_output(name: str):
    root = os.path.join(os.sep, "srv", "out")
    if is_valid_domain_name(name):
        resolved = os.path.normpath(os.path.join(root, name))
        assert os.path.dirname(resolved) == root and os.path.basename(resolved) == name
        assert not name.startswith((".", "-")) and "\0" not in name


def test_overwrite_replaces_only_an_earlier_pike_prep_output(tmp_path: Path, good_jsonl: str):
    precious = tmp_path / "project"
    (precious / "src").mkdir(parents=True)
    (precious / "src" / "main.py").write_text("print('keep me')\n")
    outcome = run_main(["--domain", f"{DOMAIN}={good_jsonl}", "--out", str(precious), "--overwrite"])
    assert contract_violation(outcome, domain=None, file=str(precious)) is None and outcome.code == 2
    assert "is not a pike-prep output (no manifest.json)" in outcome.stderr
    assert (precious / "src" / "main.py").read_text() == "print('keep me')\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


# ---------------------------------------------------------------- unsafe MDS encodings


class _Tripwire:
    """Pickles to a call that creates a file: if the loader ever unpickles it, the file appears."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def write_pickle_domain(out: Path, tripwire: Path, pickled_column: str) -> None:
    from streaming import MDSWriter

    columns = {"tokens": "ndarray:uint16:8", "domain": "str", "extra": "int"}
    columns[pickled_column] = "pkl"
    with MDSWriter(out=str(out), columns=columns, hashes=["xxh64"]) as writer:
        for i in range(4):
            sample = {"tokens": np.arange(8, dtype=np.uint16) + i, "domain": "evil", "extra": i}
            sample[pickled_column] = _Tripwire(tripwire)
            writer.write(sample)
    assert not tripwire.exists() and "pkl" in (out / "index.json").read_text()


@pytest.mark.parametrize("pickled_column", ["extra", "tokens"])
def test_mixture_dataset_refuses_pickle_columns(tmp_path: Path, pickled_column: str):
    from composer_pike.data import DomainSource, MixtureDataset

    tripwire = tmp_path / "unpickled"
    write_pickle_domain(tmp_path / "evil", tripwire, pickled_column)
    with pytest.raises(ValueError, match=rf"\b{pickled_column}\b.*\bpkl\b"):
        MixtureDataset([DomainSource("evil", str(tmp_path / "evil"))])
    assert not tripwire.exists()


def test_pickle_column_error_names_the_domain(tmp_path: Path):
    from composer_pike.data import DomainSource, MixtureDataset

    write_pickle_domain(tmp_path / "evil", tmp_path / "unpickled", "extra")
    with pytest.raises(ValueError, match=r"domain 'evil'.*\bextra\b.*\bpkl\b"):
        MixtureDataset([DomainSource("evil", str(tmp_path / "evil"))])


# ---------------------------------------------------------------- credentials


FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPIKEFAKEKEYID777",
    "AWS_SECRET_ACCESS_KEY": "pikeFAKEsecret/KEY+0123456789abcdefXYZ",
    "AWS_SESSION_TOKEN": "PIKEFAKESESSIONTOKEN0123456789",
}
ENDPOINT_USER, ENDPOINT_PASSWORD = "pikeENDPOINTuser", "PIKE-ENDPOINT-PASSWORD-42"
ALL_SECRETS = [*FAKE_SECRETS.values(), ENDPOINT_USER, ENDPOINT_PASSWORD]


def secret_env(endpoint_url: str, port: int | None = None) -> dict[str, str]:
    """The fake credentials, with the moto endpoint rewritten to carry user:password@ (and another port)."""
    scheme, _, address = endpoint_url.partition("://")
    host, _, own_port = address.partition(":")
    endpoint = f"{scheme}://{ENDPOINT_USER}:{ENDPOINT_PASSWORD}@{host}:{port or own_port}"
    return {**FAKE_SECRETS, "S3_ENDPOINT_URL": endpoint}


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in ALL_SECRETS:
            assert secret not in text, f"{secret!r} leaked: {text[:300]!r}"


def test_credentials_never_reach_output_logs_or_manifest(tmp_path: Path, s3_server, good_jsonl: str):
    """A real run to s3:// in its own process, with fake credentials in the environment and the
    endpoint URL: nothing it prints and nothing it uploads holds them."""
    bucket = s3_server.create_bucket("pike-hostile-creds")
    remote = f"{bucket}/run"
    result = subprocess.run(
        [sys.executable, "-m", "streaming_prep", "--domain", f"web={good_jsonl}", "--domain", f"code={good_jsonl}",
         "--out", remote, "--seq-len", "16", "--workers", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, **secret_env(s3_server.endpoint_url)},
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {remote}" in result.stdout
    assert_no_secret(result.stdout, result.stderr)
    client = s3_server.client()
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="pike-hostile-creds", Prefix="run/")["Contents"]]
    assert "run/manifest.json" in keys and any(key.endswith("/index.json") for key in keys)
    for key in keys:
        if key.endswith(".json"):
            assert_no_secret(key, client.get_object(Bucket="pike-hostile-creds", Key=key)["Body"].read().decode())


def test_credentials_never_reach_error_messages(tmp_path: Path, s3_server, good_jsonl: str, monkeypatch, caplog):
    """Error paths that print the remote: a missing bucket, an unreachable endpoint, credentials in
    the output URL, and uploads that fail (shard and manifest)."""
    from streaming.base.storage.upload import S3Uploader

    s3_server.create_bucket("pike-hostile-errors")
    domain = ["--domain", f"{DOMAIN}={good_jsonl}", "--seq-len", "16"]
    for key, value in secret_env(s3_server.endpoint_url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the unreachable endpoint fails at once

    def failing_run(out: str, expected: str, domain_named: bool = False) -> None:
        outcome = run_main([*domain, "--out", out])
        assert contract_violation(outcome, domain=DOMAIN if domain_named else None) is None and outcome.code == 2
        assert expected in outcome.stderr, outcome.stderr
        assert_no_secret(outcome.stdout, outcome.stderr, caplog.text)

    failing_run("s3://pike-no-such-bucket/x", f"{ERROR_PREFIX}s3://pike-no-such-bucket/x: cannot write here")
    failing_run(f"s3://{ENDPOINT_USER}:{ENDPOINT_PASSWORD}@pike-hostile-errors/x",
                f"{ERROR_PREFIX}s3://***@pike-hostile-errors/x: credentials in the URL are not supported")

    def upload_fails(self, filename: str) -> None:
        from botocore.exceptions import EndpointConnectionError

        if filename.startswith(failing_file):
            raise EndpointConnectionError(endpoint_url=f"{os.environ['S3_ENDPOINT_URL']}/{filename}")
        original_upload(self, filename)

    original_upload = S3Uploader.upload_file
    monkeypatch.setattr(S3Uploader, "upload_file", upload_fails)
    failing_file = "shard."
    failing_run("s3://pike-hostile-errors/shard-fails",
                f"s3://pike-hostile-errors/shard-fails/{DOMAIN}/train: uploading a shard failed: "
                f"Could not connect to the endpoint URL: \"http://***@", domain_named=True)
    failing_file = "manifest.json"
    failing_run("s3://pike-hostile-errors/manifest-fails",
                "s3://pike-hostile-errors/manifest-fails: uploading manifest.json failed: "
                "Could not connect to the endpoint URL: \"http://***@")
    monkeypatch.setattr(S3Uploader, "upload_file", original_upload)

    unreachable = secret_env(s3_server.endpoint_url, port=1)["S3_ENDPOINT_URL"]
    monkeypatch.setenv("S3_ENDPOINT_URL", unreachable)
    failing_run("s3://pike-hostile-errors/y", "cannot write here: Could not connect to the endpoint URL: "
                                              f"\"http://***@{unreachable.rpartition('@')[2]}/pike-hostile-errors\"")
