"""What each kind of recorded digest means, and the Debian command that recomputes it.

A digest is written ``<kind>:<hex>`` so that a change of kind keeps every
old record verifiable.  New backups record ``xxh128x64m``; ``sha256x64m``
(the default before it) and the whole-file ``sha256:`` of still older
records verify as they always did.

Why ``xxh128x64m`` (XXH3-128 of 64 MiB pieces): the digest guards against
rot and truncation, not against an attacker who can rewrite the metadata
as well, so a 128-bit non-cryptographic hash is enough (ZFS and borg use
one for the same job), and it costs next to nothing.  Measured on the
project's 2-core machine (AMD EPYC, 256 MiB in 1 MiB updates, CPU time of
the hashing thread): XXH3-128 ≈ 9.8 GB/s per core, BLAKE3 (one thread)
3.1 GB/s, SHA-256 with SHA-NI 1.45 GB/s.  Only XXH3-128 meets the goal of
5 GB/s per core, and Debian's ``xxhash`` package checks it.  Its digest is
exactly what

    split -b 64M --filter='xxhsum -H2' FILE | cut -c1-32 | xxhsum -H2

prints: each piece's XXH3-128 as its 32 hex digits and a newline (``cut``
keeps the hex of the ``<hex>  stdin`` line ``xxhsum`` writes, so the rule
does not depend on how an xxhsum version names its standard input), and
the XXH3-128 of those lines.  An empty file has no pieces: the XXH3-128 of
nothing.  ``sha256x64m`` is the same with ``sha256sum`` and its whole
``<hex>  -`` lines: ``split -b 64M --filter=sha256sum FILE | sha256sum``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Optional, Protocol, Union

import xxhash


class Hasher(Protocol):
    """What hashlib's objects and xxhash's have in common, and all the digests need."""

    def update(self, data: Union[bytes, memoryview], /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class PieceKind:
    """A digest of a file's pieces: PIECE_HASH of each piece, then of the lines LINE makes."""

    piece_hash: str
    line_suffix: str
    """What follows each piece's hex on its line: ``sha256sum``'s ``  -``, nothing after cut."""


PIECE_KINDS = {
    "xxh128x64m": PieceKind(piece_hash="xxh3_128", line_suffix=""),
    "sha256x64m": PieceKind(piece_hash="sha256", line_suffix="  -"),
}
ALGORITHM = "xxh128x64m"
"""What new backups record."""
PIECE_SIZE = 64 << 20
"""The ``64M`` of ``split -b 64M``: the piece size every ``…x64m`` kind means."""
WHOLE_FILE_ALGORITHMS = frozenset({"sha256", "sha512", "sha1", "blake2b", "blake2s", "sha3_256"})
KNOWN_ALGORITHMS = WHOLE_FILE_ALGORITHMS | set(PIECE_KINDS)
CHUNK = 1 << 20


def new_hasher(name: str) -> Hasher:
    """A fresh hash object: XXH3-128 from the ``xxhash`` wheel, the others from hashlib.

    Both release the GIL while they hash a large buffer, so the pool's
    threads hash on every core.
    """
    if name == "xxh3_128":
        return xxhash.xxh3_128()
    return hashlib.new(name)


def hash_name(algorithm: str) -> str:
    """What hashes the bytes of a file of kind ALGORITHM (or of each of its pieces)."""
    kind = PIECE_KINDS.get(algorithm)
    return kind.piece_hash if kind else algorithm


def hex_length(algorithm: str) -> int:
    """How many hex digits a digest of kind ALGORITHM has."""
    return 32 if hash_name(algorithm) == "xxh3_128" else hashlib.new(hash_name(algorithm)).digest_size * 2


def is_pieces(algorithm: str) -> bool:
    return algorithm in PIECE_KINDS


@functools.lru_cache(maxsize=8)
def zeros_digest(length: int, name: str) -> str:
    """Hex digest (hash NAME) of LENGTH zero bytes: what a piece lying in a hole hashes to."""
    digest = new_hasher(name)
    chunk = bytes(min(CHUNK, length))
    for offset in range(0, length, CHUNK):
        digest.update(chunk[:min(CHUNK, length - offset)])
    return digest.hexdigest()


def combine_pieces(piece_hexes: list[str], algorithm: str = "sha256x64m") -> str:
    """The hex the by-hand pipeline of ALGORITHM prints for pieces with PIECE_HEXES."""
    kind = PIECE_KINDS[algorithm]
    lines = "".join(f"{h}{kind.line_suffix}\n" for h in piece_hexes)
    digest = new_hasher(kind.piece_hash)
    digest.update(lines.encode("ascii"))
    return digest.hexdigest()


def algorithm_of(recorded: Optional[str]) -> Optional[str]:
    """The kind of a recorded digest, or None when there is none we can recompute.

    The metadata is untrusted: only well-formed digests of known kinds are
    recomputed, anything else counts as "no digest recorded".
    """
    if not isinstance(recorded, str):
        return None
    algorithm, _, hexdigest = recorded.partition(":")
    if algorithm not in KNOWN_ALGORITHMS or len(hexdigest) != hex_length(algorithm):
        return None
    if any(c not in "0123456789abcdef" for c in hexdigest):
        return None
    return algorithm
