"""The verdicts ``qmprestore verify`` gives a backup file, with the one description of each."""

from __future__ import annotations

from libqmpbackup.store.names import WordEnum


class FileStatus(WordEnum):
    """A file's status in ``qmprestore verify`` (its table, ``--json`` and the error lines)."""

    OK = "ok"
    DAMAGED = "damaged"
    MISSING = "missing"
    UNVERIFIABLE = "unverifiable"
    EXTRA = "extra"

    @property
    def bad(self) -> bool:
        """Whether the file fails verify (exit 11); an unverifiable file does not."""
        return self in (FileStatus.DAMAGED, FileStatus.MISSING, FileStatus.EXTRA)

    @property
    def description(self) -> str:
        return STATUS_DESCRIPTIONS[self]


STATUS_DESCRIPTIONS: dict[str, str] = {
    FileStatus.OK: "checksum, qemu-img check, backing file and size are right",
    FileStatus.DAMAGED: "checksum mismatch, truncated or unreadable, corruption, "
                        "wrong backing file, size or name",
    FileStatus.MISSING: "recorded in the metadata, not in the folder",
    FileStatus.UNVERIFIABLE: "no checksum recorded (backed up before checksums existed, or with "
                             "--no-checksum), everything else fine",
    FileStatus.EXTRA: "a backup file no chain lists (restores refuse its folder)",
}
"""One table; docs/json.md's ``counts`` rows say the same (tests/unit/test_docs.py checks the names)."""
