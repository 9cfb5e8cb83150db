"""A node's key files in its data directory.

``identity.key`` holds the long-term Ed25519 identity (the node id derives from it);
``onion.key`` holds the X25519 onion key relays and inference nodes publish. Both are PKCS#8
PEM files with mode 0600, created on first start and reused after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from swarmserve.native import Identity, OnionKey

__all__ = ["NodeKeys"]

IDENTITY_FILE = "identity.key"
ONION_FILE = "onion.key"


@dataclass(frozen=True)
class NodeKeys:
    """The keys of one node and the directory they live in."""

    directory: Path
    identity: Identity
    onion: OnionKey

    @classmethod
    def load_or_create(cls, directory: Path) -> NodeKeys:
        """Loads both keys from ``directory``, creating any that is missing.

        The directory is created with mode 0700. A key file that group or others can read
        raises :class:`swarmserve.native.KeyFileError` rather than being used.
        """
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity_path = directory / IDENTITY_FILE
        onion_path = directory / ONION_FILE
        if not os.path.exists(identity_path):
            Identity.generate().save(identity_path)
        if not os.path.exists(onion_path):
            OnionKey.generate().save(onion_path)
        return cls(directory, Identity.load(identity_path), OnionKey.load(onion_path))
