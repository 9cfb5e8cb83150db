"""swarmserve: a decentralized LLM serving overlay.

Map of the package (the repository README has the whole layout):

- ``swarmserve.native``: the Rust core (onion layers, identity, token-stream commitments).
- ``swarmserve.v1``: gRPC stubs generated from ``proto/swarmserve/v1`` by ``make proto``.
- ``swarmserve.config``: validated node configuration from YAML with environment overrides.
- ``swarmserve.telemetry``: structured logging.
- ``swarmserve.rpc``: the gRPC server bootstrap every service uses.
- ``swarmserve.keys``: a node's key files in its data directory.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarmserve")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
