"""Atomic checkpoints: staged in a temp dir, sealed with a manifest of sha256 checksums, renamed into place.

A round's checkpoint is written in three steps so that a crash at any moment leaves either the previous state or the
complete new one, never something that looks complete and is not:

1. `staging_dir(final)` makes a hidden sibling of `final` (`.round_0003.tmp-<pid>-<uuid>`). The driver and the
   learner ranks (Ray actors on the same filesystem) write their files into it.
2. `commit(staging, final, meta)` hashes and fsyncs every file, writes `manifest.json` last (format version, the
   caller's `meta`, and path / size / sha256 of every file), fsyncs the dirs, then renames staging to `final`. A
   rename within one filesystem is atomic, so `final` never exists half-written.
3. On resume, `latest_good(root)` returns the newest `round_NNNN` that `verify` accepts, says which newer ones it
   skipped and why, and removes staging dirs left behind by a killed process.

Files are only ever hashed as bytes; the manifest is the one file parsed (json). Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "omni-ray-checkpoint"
FORMAT_VERSION = 1
# Streaming chunk for sha256: checkpoint files can be many GB, so they are never read whole.
CHUNK_BYTES = 4 << 20

_ROUND_RE = re.compile(r"round_(\d+)")
# Names made by staging_dir ("tmp") and by the rename-aside of a replaced or pruned checkpoint ("trash"). The leading
# dot and the suffix keep them from ever matching _ROUND_RE, so they can never be taken for a checkpoint.
_ASIDE_RE = re.compile(r"\..+\.(tmp|trash)-(\d+)-[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be committed or trusted; names the checkpoint dir and the offending file."""

    def __init__(self, ckpt: Path, file: str, problem: str):
        self.ckpt = Path(ckpt)
        self.file = file
        self.problem = problem
        self.detail = f"{file} {problem}"
        super().__init__(f"checkpoint {ckpt}: {self.detail}")


def staging_dir(final_dir: Path) -> Path:
    """A fresh, empty dir to write `final_dir`'s files into before `commit`.

    It sits next to `final_dir` so the final rename stays on one filesystem (atomic; across filesystems it would be
    a copy). The pid in its name tells `latest_good` which process owns it; the uuid keeps concurrent or repeated
    attempts apart.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    path = _aside_path(final_dir, "tmp")
    path.mkdir()
    return path


def commit(staging: Path, final_dir: Path, meta: dict[str, Any]) -> Path:
    """Seal `staging` with a manifest and atomically make it `final_dir`; returns `final_dir`.

    Every file under `staging` is hashed and fsynced, then `manifest.json` is written and fsynced last: a dir without
    a manifest is by definition a partial write. If `final_dir` already exists (a round re-run after resuming from
    an earlier one) it is renamed aside first, the new dir renamed in, and only then the old one removed; if the
    second rename fails the old one is put back. A crash between those two renames leaves no `final_dir` at all,
    so `latest_good` falls back to the round before: never a mix of old and new files.

    Raises CheckpointError (nothing renamed) for a symlink or special file in `staging` (a checksum cannot vouch for
    what a link points to), a file already named `manifest.json`, or a `meta` that is not JSON.
    """
    staging, final_dir = Path(staging), Path(final_dir)
    if staging.parent.resolve() != final_dir.parent.resolve():
        raise ValueError(f"staging dir {staging} is not next to {final_dir}: the rename would not be atomic")
    if not staging.is_dir():
        raise CheckpointError(staging, staging.name, "is not a directory (was it made by staging_dir?)")
    try:  # before hashing GBs: a meta that cannot be written fails fast
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(staging, MANIFEST, f"cannot hold meta: {e}") from e
    files = []
    for rel in _walk(staging):
        path = staging / rel
        if rel == MANIFEST:
            raise CheckpointError(staging, rel, "is reserved for the manifest; a writer must not create it")
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(staging, rel, "is not a regular file (symlink or special file)")
        size, digest = _hash_file(path, fsync=True)
        files.append({"path": rel, "size": size, "sha256": digest})
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "meta": meta, "files": files}
    with open(staging / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(staging, topdown=False):
        _fsync_dir(Path(dirpath))

    if final_dir.exists() or final_dir.is_symlink():
        old = _aside_path(final_dir, "trash")
        os.replace(final_dir, old)
        try:
            os.replace(staging, final_dir)
        except BaseException:
            os.replace(old, final_dir)
            raise
        _fsync_dir(final_dir.parent)
        shutil.rmtree(old)
    else:
        os.replace(staging, final_dir)
        _fsync_dir(final_dir.parent)
    return final_dir


def verify(ckpt: Path, checksums: bool = True) -> dict[str, Any]:
    """Check `ckpt` against its manifest and return the committed `meta`; raise CheckpointError on any mismatch.

    Checked: the manifest exists, parses and has this module's format; every listed file exists as a regular file
    with the listed size (all sizes first: a truncation is found without hashing GBs) and, with `checksums`,
    sha256; and no file exists that the manifest does not list. Extra files are an error because a checkpoint dir is
    never written after its commit, and loaders read dirs by listing (HF shard globs, DeepSpeed tags): an unlisted
    file could change what gets loaded without any checksum having vouched for it.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(ckpt, ckpt.name, "is not a directory")
    manifest = _read_manifest(ckpt)
    listed = {f["path"]: f for f in manifest["files"]}
    for rel, entry in listed.items():
        path = ckpt / rel
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(ckpt, rel, "missing (listed in the manifest)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(ckpt, rel, f"has {size} bytes, manifest says {entry['size']}: truncated or rewritten")
    for rel in _walk(ckpt):
        if rel != MANIFEST and rel not in listed:
            raise CheckpointError(ckpt, rel, "is not in the manifest: written after the commit")
    if not checksums:
        return manifest["meta"]
    for rel, entry in listed.items():
        _, digest = _hash_file(ckpt / rel, fsync=False)
        if digest != entry["sha256"]:
            raise CheckpointError(ckpt, rel, "sha256 does not match the manifest: corrupt")
    return manifest["meta"]


def latest_good(root: Path, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest `root/round_NNNN` that verifies, with its meta; None when there is none.

    Each newer checkpoint that fails is logged with the reason and the round resumed from instead, so a silent
    step back in training cannot happen. Unusable checkpoints are left in place for inspection (re-running their
    round replaces them). First, staging and aside dirs left by a killed process are removed (and logged): call
    this before any writer of `root` starts; only dirs named with this process's own pid are left alone.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    for entry in sorted(root.iterdir()):
        m = _ASIDE_RE.fullmatch(entry.name)
        if m and entry.is_dir() and int(m.group(2)) != os.getpid():
            shutil.rmtree(entry)
            why = "checkpoint write (never committed)" if m.group(1) == "tmp" else "replace or prune (superseded)"
            log(f"[omni-ray] removed {entry}: left behind by an interrupted {why}")
    bad: list[CheckpointError] = []
    for ckpt in _rounds(root):
        try:
            meta = verify(ckpt)
        except CheckpointError as e:
            bad.append(e)
            continue
        for e in bad:
            log(f"[omni-ray] checkpoint {e.ckpt} is unusable ({e.detail}); resuming from {ckpt.name}")
        return ckpt, meta
    for e in bad:
        log(f"[omni-ray] checkpoint {e.ckpt} is unusable ({e.detail}); no earlier checkpoint is usable")
    return None


def prune(root: Path, keep: int) -> list[Path]:
    """Delete every `round_NNNN` older than the `keep`-th newest good checkpoint; returns what was deleted.

    Checkpoints are checked newest first until `keep` good ones are found; with fewer than `keep` good ones nothing
    is deleted, so the newest good checkpoint (and an only good one) always survives a partial or interrupted write.
    Older unusable ones go too (a newer good one supersedes them); unusable ones newer than the kept set stay for
    inspection. "Good" here is the manifest, the file list and the sizes, not the checksums: prune runs after every
    round's commit, and re-hashing `keep` checkpoints of a 7B policy each round would cost minutes of disk reads to
    guard against bit rot within a round or two; `latest_good` still hashes everything before a resume. Each doomed
    dir is renamed aside before removal, so a kill mid-delete leaves no half-deleted `round_NNNN`.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest good checkpoint must be kept")
    rounds = _rounds(Path(root))
    good = 0
    for i, ckpt in enumerate(rounds):
        try:
            verify(ckpt, checksums=False)
        except CheckpointError:
            continue
        good += 1
        if good == keep:
            doomed = rounds[i + 1 :]
            break
    else:
        return []
    for ckpt in doomed:
        aside = _aside_path(ckpt, "trash")
        os.replace(ckpt, aside)
        shutil.rmtree(aside)
    return doomed


# ---------------------------------------------------------------------------------------------------------------------


def _aside_path(final_dir: Path, kind: str) -> Path:
    return final_dir.parent / f".{final_dir.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex}"


def _rounds(root: Path) -> list[Path]:
    """`root/round_NNNN` entries, newest (highest round) first; none when `root` does not exist."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ROUND_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def _walk(top: Path) -> list[str]:
    """Relative posix paths of every non-directory entry under `top`; symlinks are listed, never followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        base = Path(dirpath)
        names = filenames + [d for d in dirnames if (base / d).is_symlink()]
        out += [(base / n).relative_to(top).as_posix() for n in names]
    return sorted(out)


def _hash_file(path: Path, fsync: bool) -> tuple[int, str]:
    """(size, sha256 hex) read in CHUNK_BYTES pieces; with fsync, also flushes the file (whoever wrote it) to disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make the dir's entries (created files, renames) durable: fsyncing a file does not persist its name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(ckpt: Path) -> dict[str, Any]:
    """The parsed manifest, with its shape checked so that verify can trust every field it reads."""
    path = ckpt / MANIFEST
    if not path.exists():
        raise CheckpointError(ckpt, MANIFEST, "missing: partial write")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(ckpt, MANIFEST, f"unreadable: {e}") from e

    def malformed(why: str) -> CheckpointError:
        return CheckpointError(ckpt, MANIFEST, f"malformed: {why}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise malformed(f"not an {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise malformed(f"format version {manifest.get('version')!r}, this code reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("meta"), dict) or not isinstance(manifest.get("files"), list):
        raise malformed("'meta' must be an object and 'files' a list")
    seen = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            raise malformed(f"file entry {entry!r} is not an object")
        rel, size, digest = entry.get("path"), entry.get("size"), entry.get("sha256")
        if not isinstance(rel, str) or not _is_inside(rel) or rel == MANIFEST or rel in seen:
            raise malformed(f"bad or repeated file path {rel!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise malformed(f"bad size {size!r} for {rel}")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise malformed(f"bad sha256 {digest!r} for {rel}")
        seen.add(rel)
    return manifest


def _is_inside(rel: str) -> bool:
    """A relative, normalized path that stays inside the checkpoint dir (a manifest must not point elsewhere)."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)
