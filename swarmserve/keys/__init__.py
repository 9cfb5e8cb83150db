"""A node's keys: the long-term Ed25519 identity in ``identity.key`` in its data directory (a
PKCS#8 PEM file with mode 0600, created on first start and reused after; the node id derives
from it), and the X25519 onion keys relays and inference nodes publish, which live only in
memory and rotate (:class:`OnionKeyRing`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from swarmserve.keys.onion_ring import OnionKeyRing, OpenedSetup
from swarmserve.native import Identity, KeyFileError

__all__ = ["NodeKeys", "OnionKeyRing", "OpenedSetup"]

IDENTITY_FILE = "identity.key"


@dataclass(frozen=True)
class NodeKeys:
    """The identity of one node and the directory it lives in."""

    directory: Path
    identity: Identity

    @classmethod
    def load_or_create(cls, directory: Path, pem: str | None = None) -> NodeKeys:
        """Loads the identity from ``directory``, creating it if it is missing; with ``pem``
        (an operator's key, from a secret store), that key, written there if missing.

        The directory is created with mode 0700. A key file that group or others can read
        raises :class:`swarmserve.native.KeyFileError` rather than being used, and so does a
        key file holding another key than ``pem`` (the node's identity would change silently).
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity_path = directory / IDENTITY_FILE
        given = Identity.from_pem(pem) if pem is not None else None
        if not os.path.exists(identity_path):
            (given or Identity.generate()).save(identity_path)
        identity = Identity.load(identity_path)
        if given is not None and given.public_key != identity.public_key:
            raise KeyFileError(f"{identity_path} holds another identity key than the one configured (identity_key)")
        return cls(directory, identity)
