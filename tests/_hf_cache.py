"""A Hugging Face Hub cache laid out as ``snapshot_download`` leaves it, for offline tests of ``hf-hub:`` loaders."""

from __future__ import annotations

from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hf_cache(hub_cache: Path, repo_id: str, src: Path) -> None:
    """Copy ``src``'s files into ``<hub_cache>/models--owner--name/snapshots/<commit>/`` and point ``refs/main`` at it."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
