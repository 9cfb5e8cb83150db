"""Keys and the ledger's genesis for the container swarm of deploy/compose.yaml.

Writes, into the folder given (default: deploy/compose-data, ignored by git):
  keys/NODE.pem   each node's identity key (PKCS#8 PEM, mode 0600), mounted into its container
                  as a compose secret;
  genesis.json    the chain: the three relays and the router as validators (at their fixed
                  addresses on the swarm network), one operator account that the router, the
                  inference nodes and the verifier share, with credits and stake.
Existing keys and genesis are kept (the chain goes on where it stopped).
Run: `python deploy/compose_init.py` (make compose-up and tests/test_containers.py do).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swarmserve.chain import Genesis, GenesisAccount, GenesisValidator  # noqa: E402
from swarmserve.native import Identity  # noqa: E402
from swarmserve.swarm import LOCAL_CHAIN, OPERATOR_CREDITS, OPERATOR_STAKE  # noqa: E402

# Every node of deploy/compose.yaml and its fixed address on the swarm network.
NODES = {
    "relay-1": "172.25.0.11",
    "relay-2": "172.26.0.12",
    "relay-3": "172.27.0.13",
    "router": "172.24.0.2",
    "inference-1": "172.28.0.21",
    "inference-2": "172.29.0.22",
    "verifier-1": "172.30.0.31",
}
VALIDATORS = ["relay-1", "relay-2", "relay-3", "router"]
CONSENSUS_PORT = 7300
OPERATOR_MEMBERS = ["router", "inference-1", "inference-2", "verifier-1"]


def key(folder: Path, name: str) -> Identity:
    path = folder / "keys" / f"{name}.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Identity.generate().to_pem())
        # Read inside the container by its user (uid 10001) through a read-only mount; a local
        # test swarm's keys, not an operator's (those belong in a secret store).
        path.chmod(0o644)
    return Identity.from_pem(path.read_text())


def main(folder: Path) -> None:
    keys = {name: key(folder, name) for name in [*NODES, "operator"]}
    genesis_path = folder / "genesis.json"
    if genesis_path.exists():
        return
    genesis = Genesis(
        name="swarmserve compose",
        created_unix_ms=int(time.time() * 1000),
        validators=[
            GenesisValidator(key=keys[n].public_key.hex(), address=f"{NODES[n]}:{CONSENSUS_PORT}") for n in VALIDATORS
        ],
        accounts=[
            GenesisAccount(
                key=keys["operator"].public_key.hex(),
                credits=OPERATOR_CREDITS,
                bonded=OPERATOR_STAKE,
                members=[keys[m].public_key.hex() for m in OPERATOR_MEMBERS],
            )
        ],
        parameters=LOCAL_CHAIN,
    )
    genesis_path.write_bytes(genesis.encode())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "deploy" / "compose-data")
