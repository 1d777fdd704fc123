"""``sluice backup`` / ``sluice restore``: a gateway's state and config in one checked archive.

A backup is a gzip'd tar holding ``manifest.json`` (format, Sluice version, gateway id, and the
size and SHA-256 of every file), the config file, and the data directory: each SQLite database
copied with SQLite's online backup API — a consistent snapshot even while the gateway writes — and
every other file (the outgoing sequence number, the console's accounts and key) as it is. Restore
checks every checksum before it writes anything, refuses an archive of another gateway, of a newer
format or with a database schema newer than this Sluice knows, and never overwrites a data
directory that holds state unless told to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from ._migrate import known_schemas, read_version
from .config import load_config
from .errors import SluiceError

__all__ = ["BackupError", "backup", "restore"]

FORMAT = 1
MANIFEST = "manifest.json"
# SQLite's side files: the backup API copies what they hold into the snapshot
SKIP_SUFFIXES = (".db-wal", ".db-shm", ".db-journal", ".tmp")


class BackupError(SluiceError):
    """An archive that cannot be made or must not be restored; the message says why."""


@dataclass
class Summary:
    archive: Path
    gateway_id: str
    files: dict[str, dict[str, Any]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _snapshot_db(src: Path, dst: Path) -> None:
    """Copy a live database with the online backup API (readers and the writer go on meanwhile)."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        target = sqlite3.connect(dst)
        try:
            source.backup(target, pages=1024)  # in steps, so the gateway's writer is never held long
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file in the archive
        finally:
            target.close()
    finally:
        source.close()


def backup(config: Path, out: Path | None = None) -> Summary:
    loaded = load_config(config)
    gateway_id = loaded.config.gateway.id
    data = Path(loaded.config.gateway.data_dir)
    if not data.is_dir():
        raise BackupError(f"{data} (gateway.data_dir) does not exist: nothing to back up")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = out or Path(f"sluice-{gateway_id}-{stamp}.tar.gz")
    files: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-backup-") as tmp:
        stage = Path(tmp)
        (stage / "data").mkdir()
        shutil.copy2(config, stage / "config.yaml")
        files["config.yaml"] = {}
        for src in sorted(data.rglob("*")):
            rel = src.relative_to(data)
            if src.is_dir() or src.name.endswith(SKIP_SUFFIXES) or src.is_symlink():
                continue
            dst = stage / "data" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".db":
                try:
                    _snapshot_db(src, dst)
                    with contextlib.closing(sqlite3.connect(dst)) as copy:
                        check = copy.execute("PRAGMA quick_check").fetchone()[0]
                except sqlite3.DatabaseError as exc:
                    check = str(exc)
                if check != "ok":
                    raise BackupError(f"{src.name} is damaged ({check}); the backup would carry the damage along")
            else:
                shutil.copy2(src, dst)
            files[f"data/{rel}"] = {}
        for name in files:
            p = stage / name
            files[name] = {"size": p.stat().st_size, "sha256": _sha256(p), "mode": p.stat().st_mode & 0o777}
        manifest = {
            "format": FORMAT,
            "sluice_version": __version__,
            "gateway_id": gateway_id,
            "created": time.time(),
            "config_name": config.name,
            "files": files,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".part")
        # the archive holds the console's key and maybe secrets: only its owner may read it
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            body = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(body), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(body))
            for name in files:
                tar.add(stage / name, arcname=name, recursive=False)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, out)
    return Summary(out, gateway_id, files)


def _read_archive(archive: Path, into: Path) -> dict[str, Any]:
    """Unpack to ``into`` and check the manifest; any fault is a BackupError naming it."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            tar.extractall(into, filter="data")  # no absolute paths, no '..', no devices or links out
    except FileNotFoundError:
        raise BackupError(f"{archive}: no such file") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BackupError(f"{archive} is damaged or truncated ({exc}); nothing was restored") from None
    try:
        manifest = json.loads((into / MANIFEST).read_text())
    except (OSError, ValueError):
        raise BackupError(f"{archive} has no readable {MANIFEST}: not a Sluice backup") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(
            f"{archive} is backup format {manifest.get('format')!r}; this Sluice ({__version__}) reads format "
            f"{FORMAT}: restore it with the Sluice version that made it ({manifest.get('sluice_version')})"
        )
    for name, meta in manifest.get("files", {}).items():
        p = into / name
        if not p.is_file():
            raise BackupError(f"{archive} lacks {name}, which its manifest lists: the archive is incomplete")
        if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
            raise BackupError(f"{archive}: {name} does not match its checksum: the archive is corrupt")
    return manifest


def _refuse_newer_schemas(archive: Path, manifest: dict[str, Any], stage: Path) -> None:
    """A database from a newer Sluice would stop the gateway at start: refuse it before anything is written."""
    for name, schema in known_schemas().items():
        path = stage / "data" / name
        try:
            found = read_version(path)
        except sqlite3.Error as exc:
            raise BackupError(f"{archive}: data/{name} is not a readable database ({exc}); nothing restored") from None
        if found is not None and found > schema.version:
            raise BackupError(
                f"{archive} was made by Sluice {manifest.get('sluice_version')}: its {name} has schema version "
                f"{found}, newer than this Sluice ({__version__}) knows ({schema.version}); install that Sluice "
                "version or a later one to restore it. Nothing was restored"
            )


def restore(archive: Path, config: Path, *, force: bool = False, with_config: bool = False) -> Summary:
    """Put an archive's data (and with ``with_config`` its config) in place of ``config``'s data_dir."""
    with tempfile.TemporaryDirectory(prefix="sluice-restore-") as tmp:
        stage = Path(tmp)
        manifest = _read_archive(archive, stage)
        _refuse_newer_schemas(archive, manifest, stage)
        target_cfg = stage / "config.yaml" if with_config else config
        loaded = load_config(target_cfg)
        data = Path(loaded.config.gateway.data_dir)
        if with_config and not Path(data).is_absolute():
            data = (config.parent / data).resolve()
        if manifest["gateway_id"] != loaded.config.gateway.id and not force:
            raise BackupError(
                f"{archive} is a backup of gateway {manifest['gateway_id']!r}, but {config} configures "
                f"{loaded.config.gateway.id!r}; pass --force to restore it anyway"
            )
        if data.exists() and any(p.suffix == ".db" for p in data.iterdir()) and not force:
            raise BackupError(
                f"{data} already holds a gateway's state; stop the gateway and pass --force to replace it "
                f"(its current files are kept as {data.name}.before-restore)"
            )
        owner = data if data.exists() else next(p for p in data.parents if p.exists())
        uid, gid = owner.stat().st_uid, owner.stat().st_gid
        if data.exists() and force:
            aside = data.with_name(data.name + ".before-restore")
            shutil.rmtree(aside, ignore_errors=True)
            data.rename(aside)
        data.mkdir(parents=True, exist_ok=True)
        for name, meta in manifest["files"].items():
            if not name.startswith("data/"):
                continue
            dst = data / name.removeprefix("data/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stage / name, dst)
            os.chmod(dst, meta.get("mode", 0o600))
            if os.geteuid() == 0:  # restored as root for the service user: the files stay the user's
                for p in (dst, *(data / d for d in dst.relative_to(data).parents)):
                    os.chown(p, uid, gid)
        if with_config:
            config.parent.mkdir(parents=True, exist_ok=True)
            tmp_cfg = config.with_name(config.name + ".restore-tmp")
            shutil.copyfile(stage / "config.yaml", tmp_cfg)
            os.chmod(tmp_cfg, manifest["files"]["config.yaml"].get("mode", 0o640))
            os.replace(tmp_cfg, config)
        return Summary(archive, manifest["gateway_id"], manifest["files"])
