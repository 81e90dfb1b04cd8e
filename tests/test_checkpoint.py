"""Atomic checkpoints (omni_ray/checkpoint.py) on plain files: commit / verify / latest_good / prune, and every way a
checkpoint can be damaged or left half-written."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from omni_ray import checkpoint
from omni_ray.checkpoint import CheckpointError, commit, latest_good, prune, staging_dir, verify

FILES = {
    "model.safetensors": b"\x00\x01weights" * 1000,
    "driver_state.json": b'{"round": 3}',
    "learner/rank_0/optim.bin": b"optimizer shard",
}


def write_files(d: Path, files: dict[str, bytes] = FILES) -> None:
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)


def make_ckpt(root: Path, r: int, files: dict[str, bytes] = FILES, meta: dict | None = None) -> Path:
    final = root / f"round_{r:04d}"
    staging = staging_dir(final)
    write_files(staging, files)
    return commit(staging, final, {"round": r} if meta is None else meta)


def stale_name(final: Path, kind: str = "tmp") -> Path:
    """An aside dir as another (killed) process would have left it."""
    return final.parent / f".{final.name}.{kind}-{os.getpid() + 1}-{uuid.uuid4().hex}"


def test_commit_then_verify_round_trips_meta_and_lists_every_file(tmp_path):
    meta = {"round": 3, "prompt_cursor": 1536, "wandb_run_id": "abc123", "nested": {"rng": [1, 2, 3]}}
    ckpt = make_ckpt(tmp_path, 3, meta=meta)

    assert ckpt == tmp_path / "round_0003"
    assert verify(ckpt) == meta
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["version"] == checkpoint.FORMAT_VERSION
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in FILES.items()
    }
    assert [p.name for p in tmp_path.iterdir()] == ["round_0003"]  # the staging dir became the checkpoint


def test_staging_dir_is_a_fresh_hidden_sibling_never_named_like_a_checkpoint(tmp_path):
    final = tmp_path / "checkpoints" / "round_0007"
    a, b = staging_dir(final), staging_dir(final)

    assert a != b and a.parent == b.parent == final.parent
    assert a.is_dir() and not any(a.iterdir())
    assert a.name.startswith(".round_0007.tmp-")
    assert latest_good(final.parent, log=lambda m: None) is None


def test_checksums_stream_in_chunks_and_catch_a_flip_in_a_late_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 7)
    data = bytes(range(256)) * 40
    ckpt = make_ckpt(tmp_path, 1, files={"big.bin": data})
    entry = json.loads((ckpt / "manifest.json").read_text())["files"][0]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()

    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (ckpt / "big.bin").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="big.bin sha256 does not match"):
        verify(ckpt)


def test_truncated_file_is_detected_and_named(tmp_path):
    ckpt = make_ckpt(tmp_path, 1)
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(100)

    with pytest.raises(CheckpointError) as e:
        verify(ckpt)
    assert e.value.file == "model.safetensors" and e.value.ckpt == ckpt
    assert str(e.value) == (
        f"checkpoint {ckpt}: model.safetensors has 100 bytes, manifest says 9000: truncated or rewritten"
    )


def test_flipped_byte_of_same_size_is_detected_and_named(tmp_path):
    ckpt = make_ckpt(tmp_path, 1)
    path = ckpt / "learner" / "rank_0" / "optim.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="learner/rank_0/optim.bin sha256 does not match the manifest: corrupt"):
        verify(ckpt)


def test_deleted_file_is_detected_and_named(tmp_path):
    ckpt = make_ckpt(tmp_path, 1)
    (ckpt / "driver_state.json").unlink()

    with pytest.raises(CheckpointError, match=r"driver_state.json missing \(listed in the manifest\)"):
        verify(ckpt)


def test_missing_manifest_is_reported_as_a_partial_write(tmp_path):
    ckpt = make_ckpt(tmp_path, 1)
    (ckpt / "manifest.json").unlink()

    with pytest.raises(CheckpointError, match="manifest.json missing: partial write"):
        verify(ckpt)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"{not json", "unreadable"),
        (b"\xff\xfe\x00garbage", "unreadable"),
        (b"", "unreadable"),
        (b"[1, 2]", "malformed: not an omni-ray-checkpoint manifest"),
        (b'{"format": "omni-ray-checkpoint", "version": 99, "meta": {}, "files": []}', "format version 99"),
        (b'{"format": "omni-ray-checkpoint", "version": 1, "meta": [], "files": []}', "'meta' must be an object"),
        (
            b'{"format": "omni-ray-checkpoint", "version": 1, "meta": {}, "files": '
            b'[{"path": "../outside", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}',
            "bad or repeated file path '../outside'",
        ),
        (
            b'{"format": "omni-ray-checkpoint", "version": 1, "meta": {}, "files": '
            b'[{"path": "model.safetensors", "size": "9000", "sha256": "' + b"0" * 64 + b'"}]}',
            "bad size '9000'",
        ),
        (
            b'{"format": "omni-ray-checkpoint", "version": 1, "meta": {}, "files": '
            b'[{"path": "model.safetensors", "size": 9000, "sha256": "xyz"}]}',
            "bad sha256 'xyz'",
        ),
    ],
)
def test_garbage_manifest_is_detected_and_named(tmp_path, content, why):
    ckpt = make_ckpt(tmp_path, 1)
    (ckpt / "manifest.json").write_bytes(content)

    with pytest.raises(CheckpointError) as e:
        verify(ckpt)
    assert e.value.file == "manifest.json" and why in str(e.value)


def test_extra_file_not_in_manifest_is_rejected(tmp_path):
    ckpt = make_ckpt(tmp_path, 1)
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"stray shard")

    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is not in the manifest"):
        verify(ckpt)


def test_commit_refuses_symlinks_and_a_writer_made_manifest(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"x")
    final = tmp_path / "round_0001"
    staging = staging_dir(final)
    (staging / "link.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(CheckpointError, match="link.bin is not a regular file"):
        commit(staging, final, {})

    staging = staging_dir(final)
    (staging / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="manifest.json is reserved"):
        commit(staging, final, {})
    assert not final.exists()


def test_commit_refuses_meta_that_is_not_json_before_renaming_anything(tmp_path):
    final = tmp_path / "round_0001"
    staging = staging_dir(final)
    write_files(staging)

    with pytest.raises(CheckpointError, match="manifest.json cannot hold meta"):
        commit(staging, final, {"rng": object()})
    assert not final.exists() and not (staging / "manifest.json").exists()


def test_commit_refuses_a_staging_dir_on_another_parent(tmp_path):
    staging = staging_dir(tmp_path / "a" / "round_0001")
    with pytest.raises(ValueError, match="not next to"):
        commit(staging, tmp_path / "b" / "round_0001", {})


def test_commit_replaces_an_existing_final_dir_and_leaves_nothing_aside(tmp_path):
    make_ckpt(tmp_path, 2, files={"old_only.bin": b"old", "model.safetensors": b"old weights"}, meta={"v": "old"})
    ckpt = make_ckpt(tmp_path, 2, meta={"v": "new"})

    assert verify(ckpt) == {"v": "new"}
    assert not (ckpt / "old_only.bin").exists()
    assert (ckpt / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["round_0002"]


def test_failed_rename_into_place_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    old = make_ckpt(tmp_path, 2, meta={"v": "old"})
    staging = staging_dir(old)
    write_files(staging)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == staging:
            raise OSError("disk on fire")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        commit(staging, old, {"v": "new"})
    monkeypatch.undo()
    assert verify(old) == {"v": "old"}


def test_latest_good_falls_back_to_the_previous_round_and_says_why(tmp_path):
    for r in (1, 2, 3, 4):
        make_ckpt(tmp_path, r)
    (tmp_path / "round_0004" / "manifest.json").unlink()
    (tmp_path / "round_0003" / "model.safetensors").write_bytes(b"short")
    logs: list[str] = []

    found = latest_good(tmp_path, log=logs.append)

    assert found == (tmp_path / "round_0002", {"round": 2})
    assert logs == [
        f"[omni-ray] checkpoint {tmp_path / 'round_0004'} is unusable (manifest.json missing: partial write); "
        "resuming from round_0002",
        f"[omni-ray] checkpoint {tmp_path / 'round_0003'} is unusable (model.safetensors has 5 bytes, manifest says "
        "9000: truncated or rewritten); resuming from round_0002",
    ]


def test_latest_good_orders_rounds_numerically_not_by_name(tmp_path):
    make_ckpt(tmp_path, 999)
    make_ckpt(tmp_path, 1000)
    assert latest_good(tmp_path, log=lambda m: None)[0].name == "round_1000"


def test_latest_good_returns_none_and_says_so_when_nothing_verifies(tmp_path):
    make_ckpt(tmp_path, 1)
    (tmp_path / "round_0001" / "manifest.json").write_text("garbage")
    logs: list[str] = []

    assert latest_good(tmp_path, log=logs.append) is None
    assert len(logs) == 1 and logs[0].endswith("no earlier checkpoint is usable")
    assert latest_good(tmp_path / "missing", log=logs.append) is None


def test_stale_staging_dirs_are_ignored_and_removed_with_a_message(tmp_path):
    make_ckpt(tmp_path, 1)
    # A killed commit of round 2 got as far as the manifest but not the rename: still not a checkpoint.
    sealed = stale_name(tmp_path / "round_0002")
    make_ckpt(tmp_path, 2).rename(sealed)
    leftover_trash = stale_name(tmp_path / "round_0001", kind="trash")
    leftover_trash.mkdir()
    logs: list[str] = []

    found = latest_good(tmp_path, log=logs.append)

    assert found == (tmp_path / "round_0001", {"round": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0001"]
    assert sorted(logs) == sorted(
        [
            f"[omni-ray] removed {sealed}: left behind by an interrupted checkpoint write (never committed)",
            f"[omni-ray] removed {leftover_trash}: left behind by an interrupted replace or prune (superseded)",
        ]
    )


def test_sigkill_mid_write_state_is_never_returned(tmp_path):
    make_ckpt(tmp_path, 1)
    # Killed while ranks were writing: files in the staging dir, no manifest.
    staging = stale_name(tmp_path / "round_0002")
    staging.mkdir()
    write_files(staging)
    # A writer that bypassed staging and was killed before the commit: a round dir with files and no manifest.
    write_files(tmp_path / "round_0003")
    logs: list[str] = []

    found = latest_good(tmp_path, log=logs.append)

    assert found is not None and found[0] == tmp_path / "round_0001"
    assert not staging.exists()
    assert any("round_0003 is unusable (manifest.json missing: partial write)" in m for m in logs)


def test_staging_dir_of_this_process_is_left_alone(tmp_path):
    """A commit in flight in this very process (e.g. ranks still writing) must survive a latest_good call."""
    staging = staging_dir(tmp_path / "round_0005")
    write_files(staging)

    assert latest_good(tmp_path, log=lambda m: None) is None
    assert staging.is_dir()


def test_prune_keeps_the_newest_n_good_checkpoints(tmp_path):
    for r in range(1, 6):
        make_ckpt(tmp_path, r)

    deleted = prune(tmp_path, keep=2)

    assert deleted == [tmp_path / f"round_{r:04d}" for r in (3, 2, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0004", "round_0005"]
    assert prune(tmp_path, keep=2) == []


def test_prune_never_deletes_the_only_good_checkpoint(tmp_path):
    for r in (1, 2, 3, 4):
        make_ckpt(tmp_path, r)
    (tmp_path / "round_0004" / "manifest.json").unlink()
    (tmp_path / "round_0002" / "driver_state.json").write_text("tampered")

    # Newest good is round 3: everything older goes, the unusable newer round 4 stays for inspection.
    assert prune(tmp_path, keep=1) == [tmp_path / "round_0002", tmp_path / "round_0001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0003", "round_0004"]
    # Fewer good checkpoints than `keep`: nothing is deleted.
    assert prune(tmp_path, keep=2) == []
    assert latest_good(tmp_path, log=lambda m: None)[0] == tmp_path / "round_0003"


def test_prune_checks_sizes_without_hashing_so_each_round_reads_no_checkpoint_bytes(tmp_path, monkeypatch):
    for r in (1, 2, 3):
        make_ckpt(tmp_path, r)
    (tmp_path / "round_0003" / "driver_state.json").write_text("x")  # truncated: prune must not count it as good

    def no_hashing(path, fsync):
        raise AssertionError(f"prune hashed {path}")

    monkeypatch.setattr("omni_ray.checkpoint._hash_file", no_hashing)
    assert prune(tmp_path, keep=1) == [tmp_path / "round_0001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0002", "round_0003"]


def test_prune_refuses_to_keep_nothing(tmp_path):
    make_ckpt(tmp_path, 1)
    with pytest.raises(ValueError, match="keep=0"):
        prune(tmp_path, keep=0)
    assert (tmp_path / "round_0001").is_dir()
