"""Tests for streaming_prep (pike-prep): readers, packing, MDS output, manifest, errors, S3, demo."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from streaming import MDSWriter, StreamingDataset
from streaming.base.util import clean_stale_shared_memory

from streaming_prep import MANIFEST_FORMAT, PrepError, prepare
from streaming_prep.cli import main
from streaming_prep.demo import DEMO_DOMAINS, build_demo_corpus
from streaming_prep.demo import main as demo_main
from streaming_prep.known_answers import main as known_answers_main
from streaming_prep.tokenizers import ByteTokenizer
from streaming_prep.writer import PackedMDSWriter, mds_columns

EOS = 1


# ---------------------------------------------------------------- helpers


def make_docs(kind: str, n: int) -> list[str]:
    """n distinct documents with ASCII, accents, CJK and emoji; lengths vary."""
    return [f"{kind} #{i}: héllo wörld ✓ 漢字 😀 " + "lorem ipsum " * (i % 5) + f"end {i}\n" for i in range(n)]


def reference_tokens(docs: list[str]) -> list[int]:
    """Byte ids of the documents, each followed by EOS, computed without numpy."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(byte + 3 for byte in doc.encode("utf-8"))
        ids.append(EOS)
    return ids


def reference_samples(docs: list[str], seq_len: int) -> list[list[int]]:
    ids = reference_tokens(docs)
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


@pytest.fixture(scope="module", autouse=True)
def clean_shared_memory() -> None:
    """Remove shared memory a crashed StreamingDataset left behind (once, before any is built)."""
    clean_stale_shared_memory()


def read_split(path: str | os.PathLike, remote: str | None = None, attempts: int = 5) -> list[dict]:
    """Every sample of an MDS split, in order, through StreamingDataset."""
    for attempt in range(attempts):
        try:
            dataset = StreamingDataset(remote=remote, local=str(path), shuffle=False, batch_size=1)
            return [dataset[i] for i in range(len(dataset))]
        except FileExistsError:  # a concurrent process took the same shared-memory name first
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)


def tokens_of(samples: list[dict]) -> list[list[int]]:
    return [sample["tokens"].tolist() for sample in samples]


def write_text_dir(directory: Path, docs: list[str]) -> None:
    """One file per document, some nested, some .md; names sort in document order."""
    for i, doc in enumerate(docs):
        path = directory / f"part{i // 4}" / (f"doc{i:03d}.md" if i % 3 == 0 else f"doc{i:03d}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    (directory / "part0" / "ignored.csv").write_text("not a document")


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc, "other": 1}) + "\n")
    return path


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def corpora(tmp_path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """One domain per input kind: (domain -> PATH, domain -> documents in reading order)."""
    docs = {kind: make_docs(kind, 13) for kind in ("txt_dir", "txt_glob", "jsonl", "jsonl_gz", "parquet", "hf")}
    write_text_dir(tmp_path / "txt_dir", docs["txt_dir"])
    write_text_dir(tmp_path / "glob", docs["txt_glob"])
    write_jsonl(tmp_path / "docs.jsonl", docs["jsonl"])
    write_jsonl(tmp_path / "docs.jsonl.gz", docs["jsonl_gz"])
    table = pa.table({"id": list(range(13)), "text": docs["parquet"]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=5)  # several record batches
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": docs["hf"]}).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    paths = {
        "txt_dir": str(tmp_path / "txt_dir"),
        "txt_glob": str(tmp_path / "glob" / "**" / "*"),
        "jsonl": str(tmp_path / "docs.jsonl"),
        "jsonl_gz": str(tmp_path / "docs.jsonl.gz"),
        "parquet": str(tmp_path / "docs.parquet"),
        "hf": str(tmp_path / "hf"),
    }
    return paths, docs


# ---------------------------------------------------------------- tokenizer, writer


def test_byte_tokenizer_matches_byt5():
    from transformers import ByT5Tokenizer

    texts = ["hello world", "héllo wörld", "漢字 and emoji 😀", "", "tab\tnewline\n\x00\x7f"]
    ours = [ids.tolist() for ids in ByteTokenizer().encode_documents(texts)]
    byt5 = ByT5Tokenizer()
    assert ours == byt5(texts)["input_ids"]  # ByT5 appends </s> (id 1), as we append EOS
    assert (ByteTokenizer.vocab_size, ByteTokenizer.eos_token_id, ByteTokenizer.pad_token_id) == (
        len(byt5),
        byt5.eos_token_id,
        byt5.pad_token_id,
    )


def test_packed_writer_is_byte_identical_to_mdswriter(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(PackedMDSWriter, "chunk_bytes", 700)  # several chunks per call
    tokens = np.random.default_rng(0).integers(3, 259, size=(500, 16)).astype(np.uint16)
    options = dict(columns=mds_columns(16, tokens.dtype), compression="zstd", hashes=["sha1", "xxh64"], size_limit=3000)
    with MDSWriter(out=str(tmp_path / "plain"), **options) as writer:
        for row in tokens:
            writer.write({"tokens": row, "domain": "dom"})
    packed = PackedMDSWriter(out=str(tmp_path / "packed"), **options)
    packed.write_samples(tokens[:123], "dom")  # two calls, so one shard spans them
    packed.write_samples(tokens[123:], "dom")
    packed.finish()
    plain_files = file_bytes(tmp_path / "plain")
    assert len(plain_files) > 3  # several shards
    assert file_bytes(tmp_path / "packed") == plain_files


# ---------------------------------------------------------------- round trips


def test_round_trip_every_input_kind(tmp_path: Path, corpora):
    paths, docs = corpora
    seq_len = 16
    manifest = prepare(paths, str(tmp_path / "out"), seq_len=seq_len, val_fraction=0, workers=2, progress=False)
    assert list(manifest["domains"]) == list(paths)
    for name in paths:
        entry = manifest["domains"][name]
        assert list(entry["splits"]) == ["train"]
        samples = read_split(tmp_path / "out" / name / "train")
        assert tokens_of(samples) == reference_samples(docs[name], seq_len), name
        assert {sample["domain"] for sample in samples} == {name}
        assert all(sample["tokens"].dtype == np.uint16 for sample in samples)
        assert entry["documents"] == len(docs[name])


def split_on_eos(tokens: list[int]) -> list[str]:
    """Decode a byte-token stream into documents (the last one may be cut)."""
    docs, current = [], []
    for token in tokens:
        if token == EOS:
            docs.append(bytes(current).decode("utf-8"))
            current = []
        else:
            current.append(token - 3)
    return docs + [bytes(current).decode("utf-8", errors="ignore")]


def test_train_val_split_by_document(tmp_path: Path):
    seq_len = 8
    docs = [f"<{i:02d}> " + "x" * (2 * seq_len + i) for i in range(40)]  # every doc longer than 2 samples
    write_jsonl(tmp_path / "d.jsonl", docs)
    manifest = prepare({"d": str(tmp_path / "d.jsonl")}, str(tmp_path / "out"), seq_len=seq_len, val_fraction=0.25,
                       size_limit=600, progress=False)
    streams = {split: sum(tokens_of(read_split(tmp_path / "out" / "d" / split)), []) for split in ("train", "val")}
    markers = {split: {doc[:4] for doc in split_on_eos(stream)} for split, stream in streams.items()}
    assert not markers["train"] & markers["val"]
    assert len(markers["val"]) == 10 == manifest["domains"]["d"]["splits"]["val"]["documents"]
    val_docs = [doc for doc in docs if doc[:4] in markers["val"]]
    train_docs = [doc for doc in docs if doc[:4] not in markers["val"]]
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        expected = reference_tokens(split_docs)
        assert streams[split] == expected[: len(streams[split])]
        assert len(expected) - len(streams[split]) == manifest["domains"]["d"]["splits"][split]["dropped_tokens"]
    assert len(list((tmp_path / "out" / "d" / "train").glob("shard.*.mds.zstd"))) > 1


def test_same_seed_gives_identical_files_and_other_seed_another_split(tmp_path: Path, corpora):
    paths, _ = corpora
    options = dict(seq_len=16, val_fraction=0.3, size_limit=2000, progress=False)
    prepare(paths, str(tmp_path / "a"), seed=7, workers=2, **options)
    prepare(paths, str(tmp_path / "b"), seed=7, workers=1, **options)
    prepare(paths, str(tmp_path / "c"), seed=8, workers=1, **options)
    files_a = file_bytes(tmp_path / "a")
    assert "manifest.json" in files_a and len(files_a) > 2 * len(paths) * 2
    assert files_a == file_bytes(tmp_path / "b")
    files_c = file_bytes(tmp_path / "c")
    val_shards = [path for path in files_a if "/val/shard" in path]
    assert any(files_a[path] != files_c.get(path) for path in val_shards)


def test_manifest_contents(tmp_path: Path, corpora):
    paths, docs = corpora
    seq_len = 16
    manifest = prepare(paths, str(tmp_path / "out"), seq_len=seq_len, val_fraction=0.2, seed=3, progress=False)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert manifest["format"] == MANIFEST_FORMAT == "composer-pike-manifest/1"
    assert (manifest["seq_len"], manifest["seed"], manifest["val_fraction"]) == (seq_len, 3, 0.2)
    assert manifest["tokenizer"] == {"name": "byte", "vocab_size": 384, "eos_token_id": 1, "pad_token_id": 0}
    assert (manifest["dtype"], manifest["compression"], manifest["hashes"]) == ("uint16", "zstd", ["xxh64"])
    for name, entry in manifest["domains"].items():
        assert entry["documents"] == len(docs[name])
        assert entry["bytes"] == sum(len(doc.encode("utf-8")) for doc in docs[name])
        assert entry["decode_errors"] == {"policy": "replace", "replaced_chars": 0, "skipped_documents": 0}
        assert sum(split["documents"] for split in entry["splits"].values()) == entry["documents"]
        assert entry["splits"]["val"]["documents"] == round(0.2 * len(docs[name]))
        total_tokens = len(reference_tokens(docs[name]))
        assert sum(s["tokens"] + s["dropped_tokens"] for s in entry["splits"].values()) == total_tokens
        for split, info in entry["splits"].items():
            assert info["path"] == f"{name}/{split}"
            assert info["tokens"] == info["samples"] * seq_len
            assert 0 <= info["dropped_tokens"] < seq_len
            assert len(read_split(tmp_path / "out" / info["path"])) == info["samples"]
        for source in entry["sources"]:
            data = Path(source["path"]).read_bytes()
            assert source["bytes"] == len(data)
            assert source["sha256"] == hashlib.sha256(data).hexdigest()
    assert len(manifest["domains"]["txt_dir"]["sources"]) == 13
    assert len(manifest["domains"]["hf"]["sources"]) > 1  # several .arrow shards, in order


def test_hf_tokenizer_directory(tmp_path: Path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

    docs = make_docs("tok", 9)
    write_jsonl(tmp_path / "d.jsonl", docs)
    ByT5Tokenizer().save_pretrained(tmp_path / "byt5")
    options = dict(val_fraction=0, progress=False)
    manifest = prepare({"d": str(tmp_path / "d.jsonl")}, str(tmp_path / "out"), tokenizer=str(tmp_path / "byt5"),
                       seq_len=16, **options)
    expected_info = {"name": str(tmp_path / "byt5"), "vocab_size": 384, "eos_token_id": 1, "pad_token_id": 0}
    assert manifest["tokenizer"] == expected_info
    assert tokens_of(read_split(tmp_path / "out" / "d" / "train")) == reference_samples(docs, 16)

    # A vocabulary over 65535 ids is stored as uint32.
    words = [f"w{i}" for i in range(70_000)]
    vocab = {"[UNK]": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=big, unk_token="[UNK]", eos_token="</s>").save_pretrained(tmp_path / "big")
    write_jsonl(tmp_path / "w.jsonl", [" ".join(words[i : i + 5] + ["w69999"]) for i in range(0, 50, 5)])
    manifest = prepare({"w": str(tmp_path / "w.jsonl")}, str(tmp_path / "out32"), tokenizer=str(tmp_path / "big"),
                       seq_len=4, **options)
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 70_002
    samples = read_split(tmp_path / "out32" / "w" / "train")
    expected = sum(([i + 2 for i in range(start, start + 5)] + [70_001, 1] for start in range(0, 50, 5)), [])
    assert sum(tokens_of(samples), []) == expected[: len(samples) * 4]
    assert samples[0]["tokens"].dtype == np.uint32

    # No EOS token: refused.
    PreTrainedTokenizerFast(tokenizer_object=big, unk_token="[UNK]").save_pretrained(tmp_path / "no_eos")
    code, _, err = run_cli(capsys, ["--domain", f"w={tmp_path / 'w.jsonl'}", "--out", str(tmp_path / "o"),
                                    "--tokenizer", str(tmp_path / "no_eos")])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"pike-prep: error: {tmp_path / 'no_eos'}: tokenizer has no eos token")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- decode policies


def test_decode_policies(tmp_path: Path, capsys):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("good document one\n")
    (tmp_path / "txt" / "b.txt").write_bytes(b"bad \xff\xfe bytes, legit \xef\xbf\xbd kept\n")
    (tmp_path / "txt" / "c.txt").write_text("good document two\n")
    with open(tmp_path / "d.jsonl", "wb") as f:
        f.write(b'{"text": "fine line"}\n')
        f.write(b'{"text": "bad \xc3 byte"}\n')
        f.write(b'{"text": "lone \\udc80 surrogate"}\n')
    domains = {"txt": str(tmp_path / "txt"), "jsonl": str(tmp_path / "d.jsonl")}

    def stream(out: str, name: str) -> list[int]:
        return sum(tokens_of(read_split(tmp_path / out / name / "train")), [])

    manifest = prepare(domains, str(tmp_path / "replace"), seq_len=4, val_fraction=0, progress=False)
    for name in domains:
        entry = manifest["domains"][name]
        assert entry["decode_errors"] == {"policy": "replace", "replaced_chars": 2, "skipped_documents": 0}
        assert entry["documents"] == 3
    replaced = {
        "txt": ["good document one\n", "bad \ufffd\ufffd bytes, legit \ufffd kept\n", "good document two\n"],
        "jsonl": ["fine line", "bad \ufffd byte", "lone \ufffd surrogate"],
    }
    for name, docs in replaced.items():
        kept_tokens = manifest["domains"][name]["splits"]["train"]["tokens"]
        assert stream("replace", name) == reference_tokens(docs)[:kept_tokens]

    manifest = prepare(domains, str(tmp_path / "skip"), seq_len=4, val_fraction=0, decode_errors="skip", progress=False)
    for name, skipped in (("txt", 1), ("jsonl", 2)):
        entry = manifest["domains"][name]
        assert entry["decode_errors"] == {"policy": "skip", "replaced_chars": 0, "skipped_documents": skipped}
        assert entry["documents"] == 3 - skipped
    kept = ["good document one\n", "good document two\n"]
    assert stream("skip", "txt") == reference_tokens(kept)[: manifest["domains"]["txt"]["splits"]["train"]["tokens"]]

    for name, where in (("txt", f"{tmp_path / 'txt' / 'b.txt'}: invalid UTF-8 at byte 4"),
                        ("jsonl", f"{tmp_path / 'd.jsonl'}: line 2: invalid UTF-8")):
        out = tmp_path / f"fail_{name}"
        code, _, err = run_cli(capsys, ["--domain", f"{name}={domains[name]}", "--out", str(out),
                                        "--decode-errors", "fail", "--seq-len", "4"])
        assert code == 2 and err.count("\n") == 1
        assert err.startswith(f"pike-prep: error: domain '{name}': {where}")
        assert not out.exists()


# ---------------------------------------------------------------- user errors


def bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (extra pike-prep arguments, expected start of the message after 'pike-prep: error: ')."""
    (tmp / "empty_dir").mkdir()
    (tmp / "blank.jsonl").write_text("\n  \n")
    (tmp / "short").mkdir()
    (tmp / "short" / "a.txt").write_text("hi")
    (tmp / "bad.txt").write_bytes(b"caf\xe9")
    (tmp / "bad.csv").write_text("a,b")
    write_jsonl(tmp / "other_field.jsonl", ["x" * 50], field="body")
    (tmp / "array.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    (tmp / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp / "number.jsonl").write_text('{"text": 5}\n')
    pq.write_table(pa.table({"body": ["x" * 50]}), tmp / "nocol.parquet")
    (tmp / "prep.yaml").write_text("seq_len: 8\nsequence_length: 8\n")
    (tmp / "prep_domain_key.yaml").write_text(f"domains:\n  x:\n    path: {tmp / 'short'}\n    field: body\n")

    def domain_case(path: Path, message: str, *flags: str) -> tuple[list[str], str]:
        return ["--domain", f"x={path}", *flags], f"domain 'x': {path}: {message}"

    def flag_case(message: str, *flags: str) -> tuple[list[str], str]:
        return list(flags), message

    short = f"{tmp / 'short'}"
    return {
        "missing path": domain_case(tmp / "missing.jsonl", "no such file or directory"),
        "missing glob": domain_case(tmp / "nothing" / "*.txt", "no .txt or .md files match"),
        "empty dir": domain_case(tmp / "empty_dir", "no .txt or .md files"),
        "no documents": domain_case(tmp / "blank.jsonl", "no documents"),
        "too few tokens": domain_case(tmp / "short", "the train split has 3 tokens, fewer than seq_len 16"),
        "decode fail": domain_case(tmp / "bad.txt", "invalid UTF-8 at byte 3", "--decode-errors", "fail"),
        "unsupported file": domain_case(tmp / "bad.csv", "unsupported file type"),
        "jsonl missing field": domain_case(tmp / "other_field.jsonl", "line 1: no field 'text'"),
        "jsonl not object": domain_case(tmp / "array.jsonl", "line 2: not a JSON object"),
        "jsonl invalid": domain_case(tmp / "broken.jsonl", "line 2: not valid JSON"),
        "jsonl not string": domain_case(tmp / "number.jsonl", "line 1: field 'text' is not a string"),
        "parquet no column": domain_case(tmp / "nocol.parquet", "no column 'text'"),
        "unknown tokenizer": flag_case("unknown tokenizer 'gpt-nonexistent'", "--tokenizer", "gpt-nonexistent"),
        "seq_len 1": flag_case("seq_len must be an integer of at least 2", "--seq-len", "1"),
        "negative seed": flag_case("seed must be a non-negative integer (got -1)", "--seed", "-1"),
        "credentials in URL": flag_case("s3://***@bucket/x: credentials in the URL are not supported",
                                        "--out", "s3://AKIAKEY:secret@bucket/x"),
        "bad NAME=PATH": flag_case("--domain 'nopath': expected NAME=PATH", "--domain", "nopath"),
        "name with ..": flag_case("invalid domain name '../x'", "--domain", f"../x={short}"),
        "absolute name": flag_case("invalid domain name '/abs'", "--domain", f"/abs={short}"),
        "name with slash": flag_case("invalid domain name 'a/b'", "--domain", f"a/b={short}"),
        "hidden name": flag_case("invalid domain name '.x'", "--domain", f".x={short}"),
        "duplicate name": flag_case(f"--domain 'good={short}': domain 'good' given twice", "--domain", f"good={short}"),
        "unknown yaml key": flag_case(f"{tmp / 'prep.yaml'}: unknown key 'sequence_length'",
                                      "--config", str(tmp / "prep.yaml")),
        "unknown domain key": flag_case("domain 'x': unknown key 'field'",
                                        "--config", str(tmp / "prep_domain_key.yaml")),
        "unknown compression": flag_case("unknown compression 'lzma9'", "--compression", "lzma9"),
        "unknown hash": flag_case("unknown hash 'md7'", "--hashes", "md7"),
        "val_fraction 1": flag_case("val_fraction must be a number in [0, 1)", "--val-fraction", "1"),
        "unknown flag": flag_case("unrecognized arguments: --sequence-length 5", "--sequence-length", "5"),
    }


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path, capsys, workers: str):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs("good", 20))
    (tmp_path / "inputs").mkdir()
    cases = bad_cases(tmp_path / "inputs")
    for number, (case, (args, expected)) in enumerate(cases.items()):
        out = tmp_path / f"run{number}" / "out"
        out.parent.mkdir()
        code, stdout, err = run_cli(capsys, ["--domain", f"good={good}", "--out", str(out), "--seq-len", "16",
                                             "--workers", workers, *args])
        assert code == 2, (case, stdout)
        assert err.count("\n") == 1 and err.startswith("pike-prep: error: " + expected), (case, err)
        assert list(out.parent.iterdir()) == [], case  # no output and no temporary directory


def test_existing_output_needs_overwrite(tmp_path: Path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs("good", 20))
    out = tmp_path / "run" / "out"
    out.mkdir(parents=True)
    assert run_cli(capsys, ["--domain", f"good={good}", "--out", str(out)])[0] == 0  # an empty directory is fine
    (out / "stray.txt").write_text("from an older run")
    before = file_bytes(out)
    code, _, err = run_cli(capsys, ["--domain", f"good={good}", "--out", str(out), "--seq-len", "8"])
    assert code == 2
    assert err == f"pike-prep: error: {out}: output exists and is not empty (pass --overwrite to replace it)\n"
    assert file_bytes(out) == before
    code, _, _ = run_cli(capsys, ["--domain", f"good={good}", "--out", str(out), "--seq-len", "8", "--overwrite"])
    assert code == 0
    assert not (out / "stray.txt").exists()
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    # A failing run with --overwrite leaves the previous output as it was.
    after = file_bytes(out)
    code, _, _ = run_cli(capsys, ["--domain", f"good={good}", "--out", str(out), "--seq-len", "100000", "--overwrite"])
    assert code == 2 and file_bytes(out) == after
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


# ---------------------------------------------------------------- CLI and config


def test_yaml_config_with_cli_overrides(tmp_path: Path, capsys):
    docs = make_docs("cfg", 10)
    write_jsonl(tmp_path / "body.jsonl", docs, field="body")
    write_jsonl(tmp_path / "text.jsonl", docs)
    (tmp_path / "prep.yaml").write_text(
        f"out: {tmp_path / 'from_yaml'}\n"
        "seq_len: 32\nval_fraction: 0\nseed: 5\ncompression: none\nhashes: [sha1, xxh64]\n"
        "domains:\n"
        f"  body:\n    path: {tmp_path / 'body.jsonl'}\n    text_field: body\n"
        f"  text: {tmp_path / 'text.jsonl'}\n"
    )
    code, stdout, err = run_cli(capsys, ["--config", str(tmp_path / "prep.yaml"), "--seq-len", "8",
                                         "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert f"wrote {tmp_path / 'o'}" in stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (manifest["seq_len"], manifest["seed"], manifest["val_fraction"]) == (8, 5, 0.0)
    assert (manifest["compression"], manifest["hashes"]) == (None, ["sha1", "xxh64"])
    assert list(manifest["domains"]) == ["body", "text"]
    assert sorted(p.name for p in (tmp_path / "o" / "body" / "train").iterdir()) == ["index.json", "shard.00000.mds"]
    for name in ("body", "text"):
        assert tokens_of(read_split(tmp_path / "o" / name / "train")) == reference_samples(docs, 8)


def test_python_dash_m_entry_point(tmp_path: Path, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", make_docs("good", 20))
    monkeypatch.setattr(sys, "argv", ["pike-prep", "--domain", f"good={good}", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("streaming_prep", run_name="__main__")
    assert exit_info.value.code == 0
    assert (tmp_path / "out" / "good" / "val" / "index.json").exists()


def test_prep_error_pickles_with_its_message():
    import pickle

    err = PrepError("line 3: not a JSON object", file="x.jsonl").in_domain("web")
    assert str(pickle.loads(pickle.dumps(err))) == "domain 'web': x.jsonl: line 3: not a JSON object"


# ---------------------------------------------------------------- S3


def test_s3_upload_and_read_back(tmp_path: Path, corpora, s3_server, capsys):
    paths, _ = corpora
    domains = {name: paths[name] for name in ("txt_dir", "hf")}
    bucket = s3_server.create_bucket("pike-prep-test")
    remote = f"{bucket}/runs/one"
    flags = [arg for name, path in domains.items() for arg in ("--domain", f"{name}={path}")]
    flags += ["--seq-len", "16", "--val-fraction", "0.2", "--size-limit", "2000", "--workers", "2"]
    code, _, err = run_cli(capsys, [*flags, "--out", remote])
    assert code == 0, err
    local_manifest = prepare(domains, str(tmp_path / "local"), seq_len=16, val_fraction=0.2, size_limit=2000,
                             progress=False)

    body = s3_server.client().get_object(Bucket="pike-prep-test", Key="runs/one/manifest.json")["Body"].read()
    assert json.loads(body) == local_manifest
    for name in domains:
        for split in ("train", "val"):
            from_s3 = read_split(tmp_path / "cache" / name / split, remote=f"{remote}/{name}/{split}")
            local = read_split(tmp_path / "local" / name / split)
            assert len(from_s3) == local_manifest["domains"][name]["splits"][split]["samples"] > 0
            assert tokens_of(from_s3) == tokens_of(local)
            assert {sample["domain"] for sample in from_s3} == {name}

    code, _, err = run_cli(capsys, [*flags, "--out", remote])
    assert code == 2
    assert err == f"pike-prep: error: {remote}: output exists and is not empty (pass --overwrite to replace it)\n"
    assert run_cli(capsys, [*flags, "--out", remote, "--overwrite"])[0] == 0

    code, _, err = run_cli(capsys, [*flags, "--out", "s3://no-such-bucket/x"])
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("pike-prep: error: s3://no-such-bucket/x: cannot write here")


# ---------------------------------------------------------------- demo corpus


def test_demo_corpus_builds_domains_of_different_sizes(tmp_path: Path, capsys):
    raw = build_demo_corpus(str(tmp_path / "raw"), max_mb_per_domain=0.4)
    assert list(raw) == list(DEMO_DOMAINS) and len(raw) >= 4
    assert demo_main(["--out", str(tmp_path / "out"), "--raw-dir", str(tmp_path / "raw_again"),
                      "--max-mb-per-domain", "0.4", "--seq-len", "128"]) == 0
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    assert all(Path(path).read_bytes() == (tmp_path / "raw_again" / Path(path).name).read_bytes() for path in raw.values())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sizes = [manifest["domains"][name]["bytes"] for name in raw]
    assert len(set(sizes)) == len(sizes)
    assert max(sizes) > 3 * min(sizes)
    assert all(entry["splits"]["train"]["samples"] > 0 for entry in manifest["domains"].values())


def test_known_answer_corpora_cli(tmp_path, capsys):
    """The duplicates corpus through the CLI: copy_b is copy_a"s shards under a second name, listed
    second; an unknown kind is refused by argparse."""
    out = tmp_path / "dup"
    assert known_answers_main(["duplicates", "--out", str(out), "--seq-len", "256"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["domains"]) == ["copy_a", "copy_b", "c_headers", "pydoc_topics"]
    a, b = manifest["domains"]["copy_a"], manifest["domains"]["copy_b"]
    assert b["splits"]["train"]["path"] == "copy_b/train" and a["splits"]["train"]["samples"] > 0
    for split in ("train", "val"):
        files = sorted(p.name for p in (out / "copy_a" / split).iterdir())
        assert files == sorted(p.name for p in (out / "copy_b" / split).iterdir())
        assert all((out / "copy_a" / split / f).read_bytes() == (out / "copy_b" / split / f).read_bytes()
                   for f in files)
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        known_answers_main(["everything", "--out", str(tmp_path / "x")])
