"""Persistent AST embedding cache: keying, invalidation, concurrency, corruption recovery, mmap reads,
client integration and CLI. Tiny AST, 1-s clips."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from flwr.app import Context, RecordDict

import client_app.node_data as node_data
from client_app.app import NODE_DATA, train
from client_app.site import NodeSite
from ops import cli
from common.cache import ClipId, EmbeddingStore, ExtractionSettings, embed_clips, open_store
from common.cache.store import TENSOR
from common.config import NodeRuntimeConfig, load_config
from common.data.esc50 import read_esc50
from common.data.synth import synthesize_dataset
from common.models.audio_encoder import AudioEncoder, audio_encoder_identity

sys.path.insert(0, str(Path(__file__).parent))
import cache_helpers  # noqa: E402
from test_client_app import make_message, run_config, server_content  # noqa: E402

CLASSES = ["dog", "siren", "rain"]
_CFG = load_config({"data.clip-seconds": 1.0, "audio-encoder.tokens": 4, "audio-encoder.batch-size": 8, "seed": 0})
SETTINGS = ExtractionSettings.of(_CFG.audio_encoder, _CFG.data, _CFG.seed)
HELPERS = Path(__file__).parent / "cache_helpers.py"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return synthesize_dataset(tmp_path_factory.mktemp("d") / "esc", CLASSES, clips_per_class=4, seed=2, clip_seconds=1.0)


@pytest.fixture
def data_copy(dataset, tmp_path) -> Path:
    """A private copy for tests that edit clips (copy2 keeps mtimes; the path, hence dataset id, differs)."""
    return Path(shutil.copytree(dataset, tmp_path / "esc"))


@pytest.fixture
def logs(caplog):
    """caplog for the project's loggers (setup_logging turns their propagation off)."""
    logger = logging.getLogger("common")
    old = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="common")
    yield caplog
    logger.propagate = old


def ast_args(**change) -> dict:
    """SETTINGS (with ``change``) as keyword arguments of AudioEncoder.build / audio_encoder_identity."""
    s = dataclasses.replace(SETTINGS, **change)
    return dict(sample_rate=s.sample_rate, reduction=s.reduction, tokens=s.tokens, dtype=s.dtype, seed=s.seed)


def clips_of(root: Path):
    return read_esc50(root)[0]


def embed(root: Path, cache: Path | None, settings: ExtractionSettings = SETTINGS, **kw):
    store = open_store(cache, root, settings) if cache is not None else None
    return embed_clips(clips_of(root), settings, store, **kw)


def store_of(root: Path, cache: Path, settings: ExtractionSettings = SETTINGS) -> EmbeddingStore:
    store = open_store(cache, root, settings)
    assert store is not None
    return store


# ----------------------------------------------------------------------------------- key / identity
def test_identity_needs_no_model_and_matches_the_built_encoder(tmp_path, monkeypatch):
    enc = AudioEncoder.build("tiny", 1.0, **ast_args(seed=5))
    assert enc.identity() == audio_encoder_identity("tiny", 1.0, **ast_args(seed=5))
    enc.save_pretrained(tmp_path / "ast")
    built = AudioEncoder.build(str(tmp_path / "ast"), 1.0, **ast_args()).identity()

    def boom(*a, **k):
        raise AssertionError("the identity must not build or load a model")

    monkeypatch.setattr("transformers.ASTModel.from_pretrained", boom)
    monkeypatch.setattr("transformers.ASTModel.__init__", boom)
    ident = audio_encoder_identity(str(tmp_path / "ast"), 1.0, **ast_args())
    assert ident == built and "files_sha256" in ident
    for key in ("sample_rate", "clip_seconds", "max_length", "reduction", "tokens", "dtype"):
        assert key in ident
    assert ident["max_length"] == 98
    monkeypatch.undo()
    AudioEncoder.build("tiny", 1.0, **ast_args(seed=6)).save_pretrained(tmp_path / "ast")  # new weights, same folder
    assert audio_encoder_identity(str(tmp_path / "ast"), 1.0, **ast_args())["files_sha256"] != ident["files_sha256"]


def test_identity_reads_extractor_defaults_without_importing_transformers():
    """A fully cached ClientApp process must not pay ~1.5 s for importing transformers to build its key."""
    from common.models import audio_encoder

    assert audio_encoder._feature_extractor_defaults_from_source() == audio_encoder._feature_extractor_defaults_from_class()
    code = ("import sys, client_app.app; from common.models.audio_encoder import audio_encoder_identity; "
            "audio_encoder_identity('tiny', 1.0, 16000, 'pool', 8, 'float32', 0); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_second_pass_hits_everything_and_equals_uncached_extraction(dataset, tmp_path):
    first = embed(dataset, tmp_path)
    n = len(clips_of(dataset))
    assert (first.stats.hits, first.stats.misses) == (0, n) and first.stats.extract_seconds > 0
    second = embed(dataset, tmp_path)
    assert (second.stats.hits, second.stats.misses) == (n, 0)
    assert second.stats.extract_seconds == 0.0 and second.stats.load_seconds > 0
    assert torch.equal(first.embeddings, second.embeddings)
    assert [c.rel_path for c in first.clips] == [c.rel_path for c in second.clips]
    assert torch.equal(embed(dataset, None).embeddings, second.embeddings)  # cache on or off: same values
    assert second.embeddings.dtype == torch.float32 and second.embeddings.shape == (n, 4, 256)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"tokens": 6}, "encoder.tokens"),
        ({"reduction": "cls"}, "encoder.reduction"),
        ({"clip_seconds": 0.5}, "encoder.clip_seconds"),
        ({"sample_rate": 22050}, "encoder.sample_rate"),
        ({"dtype": "bfloat16"}, "encoder.dtype"),
        ({"seed": 1}, "encoder.seed"),
        ({"model": "ast-folder"}, "encoder.model"),
        ({"storage_dtype": "float32"}, "storage_dtype"),
    ],
)
def test_key_field_change_is_a_miss_and_the_log_names_the_field(dataset, tmp_path, logs, change, field):
    clips = clips_of(dataset)[:3]
    embed_clips(clips, SETTINGS, store_of(dataset, tmp_path))
    if change.get("model") == "ast-folder":
        AudioEncoder.build("tiny", 1.0, **ast_args()).save_pretrained(tmp_path / "ast")
        change = {"model": str(tmp_path / "ast")}
    other = ExtractionSettings(**{**SETTINGS.__dict__, **change})
    logs.clear()
    res = embed_clips(clips, other, store_of(dataset, tmp_path, other))
    assert (res.stats.hits, res.stats.misses) == (0, 3)
    assert f"differs in {field}" in logs.text or f"; {field}:" in logs.text, logs.text
    again = embed_clips(clips, SETTINGS, store_of(dataset, tmp_path))  # the old key is still there
    assert (again.stats.hits, again.stats.misses) == (3, 0)


def test_datasets_in_different_folders_do_not_share_entries(dataset, data_copy, tmp_path):
    embed(dataset, tmp_path / "c")
    res = embed(data_copy, tmp_path / "c")  # same relative paths, another folder
    assert res.stats.hits == 0


# ----------------------------------------------------------------------------------- invalidation
def test_edited_clip_is_reextracted(data_copy, tmp_path):
    clips = clips_of(data_copy)
    embed(data_copy, tmp_path)
    edited, touched = clips[0].path, clips[1].path
    sf.write(edited, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000)
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    res = embed(data_copy, tmp_path)
    assert (res.stats.hits, res.stats.misses) == (len(clips) - 2, 2)
    assert torch.equal(res.embeddings, embed(data_copy, None).embeddings)  # the new content, not the stale row
    again = embed(data_copy, tmp_path)
    assert again.stats.misses == 0
    summary = store_of(data_copy, tmp_path).summary()
    assert summary["entries"] == len(clips) and summary["dead_rows"] == 2


# ----------------------------------------------------------------------------------- concurrency
def test_concurrent_writer_processes_lose_no_entry(tmp_path):
    workers, puts, per_put = 4, 6, 5
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, str(HELPERS), "writer", str(tmp_path / "c"), str(tmp_path / "ds"),
                          str(w), str(puts), str(per_put), str(go)], cwd=Path(__file__).parent.parent)
        for w in range(workers)
    ]
    time.sleep(0.5)
    go.touch()
    assert [p.wait(timeout=180) for p in procs] == [0] * workers
    store = EmbeddingStore.open(tmp_path / "c", tmp_path / "ds", cache_helpers.FIELDS)
    rels = [f"w{w}/c{p}-{j}.wav" for w in range(workers) for p in range(puts) for j in range(per_put)]
    rels += [f"shared/c{p}.wav" for p in range(puts)]
    got = store.lookup([ClipId(r, 100, 1) for r in rels])
    assert all(t is not None for t in got), "an entry was lost"
    assert all(torch.equal(t, cache_helpers.expected(r)) for t, r in zip(got, rels))
    report = store.verify()
    assert report.ok and not report.orphan_shards and report.entries == len(rels)
    assert report.shards == workers * puts


# ----------------------------------------------------------------------------------- integrity
def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def _data_offset(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


@pytest.mark.parametrize("index_damage", ["garble", "truncate", "delete"])
def test_corrupt_shards_and_index_are_detected_dropped_and_recomputed(data_copy, tmp_path, logs, index_damage):
    n = len(clips_of(data_copy))
    fresh = embed(data_copy, None)
    embed(data_copy, tmp_path, chunk=4)  # 3 shards of 4 rows
    store = store_of(data_copy, tmp_path)
    shards = sorted(store.shard_dir.glob("*.safetensors"))
    assert len(shards) == 3
    os.truncate(shards[0], shards[0].stat().st_size - 100)  # truncated shard: its 4 rows are lost
    row_bytes = 4 * 256 * 2
    _flip(shards[1], _data_offset(shards[1]) + row_bytes + 10)  # one flipped byte in row 1 of shard 2
    index = store.index_path
    if index_damage == "garble":
        raw = bytearray(index.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 16] = b"#" * 16
        index.write_bytes(bytes(raw))
    elif index_damage == "truncate":
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    else:
        index.unlink()
    logs.clear()
    res = embed(data_copy, tmp_path)
    assert (res.stats.hits, res.stats.misses) == (n - 5, 5)
    assert torch.equal(res.embeddings, fresh.embeddings)
    text = logs.text
    if index_damage != "delete":
        assert "index.json is corrupt" in text
    assert "corrupt" in text and "failed the checksum" in text
    assert not shards[0].exists()  # the truncated shard was removed
    again = embed(data_copy, tmp_path)
    assert again.stats.misses == 0 and torch.equal(again.embeddings, fresh.embeddings)
    assert store.verify().ok


def test_a_broken_cache_never_fails_extraction(data_copy, tmp_path, logs):
    embed(data_copy, tmp_path)
    store = store_of(data_copy, tmp_path)
    store.index_path.unlink()
    store.index_path.mkdir()  # unreadable and unwritable index
    shutil.rmtree(store.shard_dir)
    store.shard_dir.write_text("not a directory")
    res = embed(data_copy, tmp_path)
    assert res.stats.misses == len(clips_of(data_copy))
    assert torch.equal(res.embeddings, embed(data_copy, None).embeddings)
    assert "embedding cache" in logs.text and "WARNING" in logs.text


# ----------------------------------------------------------------------------------- memory
def _rss_delta(tmp_path: Path, rows: list[int], tokens: int, hidden: int) -> dict:
    out = subprocess.run(
        [sys.executable, str(HELPERS), "rss", str(tmp_path / "c"), str(tmp_path / "ds"), json.dumps(rows), str(tokens), str(hidden)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_a_subset_maps_only_its_rows(tmp_path):
    """A ~70 MiB shard: loading 5 scattered rows must not bring the shard into RAM (RSS of a fresh
    process), while loading every row does (so the measurement does see a whole-shard read).

    The bound is a fraction of the shard, not 5 x 18 KiB: on a page fault the kernel maps the whole
    page-cache folio around the row (up to 2 MiB per row with ext4 large folios on Linux 6.x).
    """
    n, tokens, hidden = 4000, 12, 768
    store = EmbeddingStore.open(tmp_path / "c", tmp_path / "ds", cache_helpers.FIELDS)
    rels = [f"c{i}.wav" for i in range(n)]
    store.put([ClipId(r, 100, 1) for r in rels], torch.stack([cache_helpers.expected(r, tokens, hidden) for r in rels]))
    shard_bytes = next(store.shard_dir.glob("*.safetensors")).stat().st_size
    assert shard_bytes > 64 * 2**20
    subset = _rss_delta(tmp_path, [0, 800, 1600, 2400, 3200], tokens, hidden)
    assert subset["ok"]
    assert subset["delta"] < 0.2 * shard_bytes, (
        f"RSS grew {subset['delta'] / 2**20:.1f} MiB for 5 rows of a {shard_bytes / 2**20:.0f} MiB shard"
    )
    full = _rss_delta(tmp_path, list(range(n - 1)), tokens, hidden)
    assert full["ok"] and full["delta"] > 0.8 * shard_bytes


# ----------------------------------------------------------------------------------- client integration
def test_fully_cached_node_builds_no_model_and_opens_no_audio(dataset, tmp_path, monkeypatch):
    rc = run_config(dataset, tmp_path, **{"audio-encoder.tokens": 4})
    cfg = load_config(rc)
    node = NodeRuntimeConfig(partition_id=0, num_partitions=2)
    first = node_data.load_node_data(cfg.data, NodeSite.of(cfg, node))
    total = sum(len(s) for s in first.splits.values())
    assert first.stats.misses == total and first.stats.hits == 0
    content = server_content(cfg)  # text targets are computed before the traps are set

    def boom(*a, **k):
        raise AssertionError("a fully cached node must not build the AST or read audio")

    monkeypatch.setattr(AudioEncoder, "build", boom)
    monkeypatch.setattr("transformers.ASTModel.__init__", boom)
    monkeypatch.setattr("transformers.ASTFeatureExtractor.__init__", boom)
    monkeypatch.setattr(sf, "read", boom)
    monkeypatch.setattr(sf, "SoundFile", boom)
    second = node_data.load_node_data(cfg.data, NodeSite.of(cfg, node))
    assert (second.stats.hits, second.stats.misses, second.stats.extract_seconds) == (total, 0, 0.0)
    for name in ("train", "val", "test"):
        assert torch.equal(first.splits[name].embeddings, second.splits[name].embeddings)
        assert second.splits[name].clip_ids == first.splits[name].clip_ids

    NODE_DATA.clear()  # the ClientApp reports the same in its train reply
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config=rc)
    metrics = train(make_message(content), ctx).content["metrics"]
    assert metrics["cache_hits"] == total and metrics["cache_misses"] == 0
    assert metrics["extract_seconds"] == 0.0 and metrics["load_seconds"] > 0
    memo = train(make_message(content), ctx).content["metrics"]  # same process, data already in memory
    assert (memo["cache_hits"], memo["cache_misses"], memo["extract_seconds"]) == (0, 0, 0.0)


def test_cache_switch_off_writes_nothing(dataset, tmp_path):
    cfg = load_config(run_config(dataset, tmp_path, **{"audio-encoder.cache": False, "audio-encoder.tokens": 4}))
    data = node_data.load_node_data(cfg.data, NodeSite.of(cfg, NodeRuntimeConfig(partition_id=0, num_partitions=2)))
    assert data.stats.hits == 0 and data.stats.misses > 0
    assert not (tmp_path / "embeddings").exists()


# ----------------------------------------------------------------------------------- CLI
def test_cli_build_info_verify_clear(data_copy, tmp_path, capsys):
    common = ["--cache-dir", str(tmp_path / "cc"), "--set", "data.dataset=esc50", "--set", f"data.root={data_copy}",
              "--set", "data.classes=dog,siren,rain", "--set", "data.clip-seconds=1.0", "--set", "audio-encoder.tokens=4"]
    n = len(clips_of(data_copy))

    def run(*args) -> tuple[int, str]:
        capsys.readouterr()
        rc = cli.main(["cache", *args])
        return rc, capsys.readouterr().out

    rc, out = run("build", *common)
    assert rc == 0 and json.loads(out)["extracted"] == n
    rc, out = run("build", *common, "--num-nodes", "2")
    assert rc == 0 and json.loads(out)["hits"] == json.loads(out)["clips"] and json.loads(out)["extracted"] == 0
    rc, out = run("info", *common, "--json")
    (info,) = json.loads(out)
    assert info["entries"] == n and info["current"] and info["fields"]["encoder"]["tokens"] == 4
    assert info["dataset_root"] == str(data_copy.resolve())
    rc, out = run("info", *common)
    assert "[current config]" in out and "tokens=4" in out

    store = EmbeddingStore.existing(Path(info["dir"]))
    shard = next(store.shard_dir.glob("*.safetensors"))
    _flip(shard, _data_offset(shard) + 3)  # row 0
    victim = json.loads(_meta(shard)["entries"])[0][0]
    rc, out = run("verify", *common)
    assert rc == 1 and "BAD" in out and victim in out
    rc, out = run("verify", *common, "--repair")
    assert rc == 0 and "after repair: OK" in out
    rc, out = run("verify", *common)
    assert rc == 0 and f"entries {n - 1}" in out
    rc, out = run("build", *common)
    assert json.loads(out)["extracted"] == 1

    assert run("clear", *common)[0] == 2  # needs --key or --all
    rc, out = run("clear", *common, "--key", info["key"][:8])
    assert rc == 0 and "removed" in out and not Path(info["dir"]).exists()
    rc, out = run("info", *common)
    assert "no embedding cache" in out


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert TENSOR in fh.keys()
        return fh.metadata()
