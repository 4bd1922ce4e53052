"""What bnnas keeps with a study beyond its trials, in Optuna's artifact store: exports and reports.

Optuna refuses to change a finished trial, so each file is an artifact of the study named for the trial it
belongs to (`export-trial-3-<settings>.zip`): optuna-dashboard lists and downloads them on the study's page, and
nas-export restores an earlier export of the same trial with the same settings instead of training it again. The
store is a folder beside a local storage file (`runs/nas.db` -> `runs/nas.db.artifacts/`) or the one `--artifacts`
names; a server storage (PostgreSQL, grpc://) has no place beside it, so its artifacts are kept only when named.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import optuna

from nas.errors import StudyError
from nas.study.storage import storage_file

SUFFIX = ".artifacts"


def default_folder(storage_url: str) -> Path | None:
    """The artifact folder beside a local storage file; None for a server storage."""
    path = storage_file(storage_url)
    return None if path is None else path.with_name(path.name + SUFFIX)


def open_store(storage_url: str, folder: str | Path | None = None):
    """Optuna's file-system artifact store for a study's storage (None: nowhere to keep artifacts)."""
    from optuna.artifacts import FileSystemArtifactStore

    place = Path(folder).expanduser() if folder else default_folder(storage_url)
    if place is None:
        return None
    try:
        place.mkdir(exist_ok=True)
    except OSError as exc:
        raise StudyError(f"--artifacts: cannot create {place}: {exc.strerror or exc}") from None
    return FileSystemArtifactStore(str(place))


def existing_store(storage_url: str):
    """The store beside a local storage file if exports made one (a reader never creates it), else None."""
    place = default_folder(storage_url)
    return open_store(storage_url) if place is not None and place.is_dir() else None


def export_name(trial_number: int, settings: dict) -> str:
    """The artifact name of an export: its trial and a digest of everything that changes what training makes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"export-trial-{trial_number}-{digest}.zip"


def find(study: optuna.Study, name: str) -> str | None:
    """The id of an artifact of the study called `name` (the same name: the same settings), or None."""
    from optuna.artifacts import get_all_artifact_meta

    found = [meta.artifact_id for meta in get_all_artifact_meta(study) if meta.filename == name]
    return found[-1] if found else None


def keep_folder(study: optuna.Study, store, folder: Path, name: str) -> str:
    """Upload `folder` as one zip artifact of the study called `name`; returns its id."""

    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / name
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    zipped.write(path, path.name)
        return keep_file(study, store, archive, "application/zip")


def keep_file(study: optuna.Study, store, path: Path, mimetype: str | None = None) -> str:
    """Upload one file as an artifact of the study (named as the file is); returns its id."""
    from optuna.artifacts import upload_artifact

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study, mimetype=mimetype)


def restore_folder(store, artifact_id: str, folder: Path) -> None:
    """Unpack a zip artifact into `folder` (created): its files by name only, nothing outside it."""
    from optuna.artifacts import download_artifact

    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "export.zip"
        download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(archive))
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.infolist():
                name = Path(member.filename).name  # a flat folder: no path of the archive's own is followed
                with zipped.open(member) as source, open(folder / name, "wb") as target:
                    shutil.copyfileobj(source, target)
