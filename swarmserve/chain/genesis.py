"""The genesis file: the chain's committee, every credit that exists at its start, and its
parameters. Credits come from here or from work paid for, never from a fresh key (a new
identity holds nothing, so many identities buy nothing).

The file's exact bytes are the first block's only transaction and its BLAKE3 digest is the
chain's id, which every transaction names: nodes started from different files never agree on a
block, and a transaction signed for one chain is void on another.
"""

from __future__ import annotations

import json
from pathlib import Path

from blake3 import blake3
from pydantic import Field, ValidationError, field_validator, model_validator

from swarmserve.config import ConfigError, StrictModel, parse_listen_address

__all__ = ["ChainParameters", "Genesis", "GenesisAccount", "GenesisValidator", "load_genesis"]


def _key(value: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("an identity key is 64 lowercase hex characters (32 bytes)")
    return value


class GenesisAccount(StrictModel):
    key: str = Field(description="the account's identity key, hex")
    credits: int = Field(0, ge=0, description="spendable credits at the start")
    bonded: int = Field(0, ge=0, description="credits bonded as stake at the start")
    members: list[str] = Field(
        default_factory=list,
        description="node keys (hex) that spend from and earn into this account: an operator's routers and "
        "inference nodes sharing one account",
    )

    _check_key = field_validator("key")(_key)

    @field_validator("members")
    @classmethod
    def _members(cls, value: list[str]) -> list[str]:
        return [_key(member) for member in value]


class GenesisValidator(StrictModel):
    key: str = Field(description="the validator's identity key, hex")
    address: str = Field(description="its consensus address, IP:PORT")

    _check_key = field_validator("key")(_key)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_listen_address(value)
        return value


class ChainParameters(StrictModel):
    block_interval_ms: int = Field(500, ge=10, le=60_000, description="at most one block per interval")
    leader_timeout_ms: int = Field(1000, ge=100, le=600_000, description="a silent leader's view is skipped after this")
    unbonding_blocks: int = Field(
        600, ge=1, description="blocks between releasing stake and having it back; it stays slashable meanwhile"
    )
    equivocation_slash_permille: int = Field(
        500, ge=0, le=1000, description="thousandths of a validator's stake burned for proven conflicting votes"
    )
    epoch_blocks: int = Field(
        100,
        ge=2,
        description="blocks per epoch: cheques settle once per epoch per pair; lotteries reseed; the committee "
        "is chosen again",
    )
    committee_size: int = Field(10, ge=1, le=100, description="most validators in an epoch's committee")
    min_committee: int = Field(
        4,
        ge=1,
        description="fewest qualifying candidates for a new committee; with fewer, the committee stays as it is "
        "(4 = 3f+1 for one faulty validator)",
    )
    validator_min_stake: int = Field(
        100, ge=1, description="bonded credits a candidate's account needs for a seat in the committee"
    )
    lottery_epochs: int = Field(
        4,
        ge=2,
        description="a lottery draw (verifiers, jurors, judges) names its epoch and stays valid for this many "
        "epochs: long enough to run a check or a duel, too short to search old epochs for a draw that suits",
    )
    verifier_min_stake: int = Field(
        10, ge=1, description="bonded credits an account needs to be drawn as verifier, appeal juror or judge"
    )
    verifiers_per_check: int = Field(3, ge=1, description="accounts the lottery assigns to each receipt")
    appeal_blocks: int = Field(
        20, ge=1, description="blocks the accused has to appeal a FAIL, and the committee has to vote"
    )
    appeal_committee: int = Field(3, ge=1, description="accounts drawn to re-execute an appealed FAIL")
    judges_per_duel: int = Field(3, ge=1, description="accounts drawn to judge each duel")
    check_fail_slash_permille: int = Field(
        500, ge=0, le=1000, description="thousandths of a provider's stake burned for a decided FAIL"
    )
    overturned_slash_permille: int = Field(
        500, ge=0, le=1000, description="thousandths of a verifier's stake burned when its FAIL is overturned"
    )
    duel_slash_permille: int = Field(100, ge=0, le=1000, description="thousandths of a duel loser's stake burned")


class Genesis(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    created_unix_ms: int = Field(ge=0)
    validators: list[GenesisValidator] = Field(min_length=1)
    accounts: list[GenesisAccount] = Field(default_factory=list)
    parameters: ChainParameters = ChainParameters()

    @model_validator(mode="after")
    def _unique(self) -> Genesis:
        members = [m for a in self.accounts for m in a.members]
        for what, keys in (
            ("validator", [v.key for v in self.validators]),
            ("account or member", [a.key for a in self.accounts] + members),
        ):
            if len(set(keys)) != len(keys):
                raise ValueError(f"a {what} key is listed twice")
        if len(self.validators) > self.parameters.committee_size:
            raise ValueError(f"more validators than parameters.committee_size ({self.parameters.committee_size})")
        return self

    def committee(self) -> list[tuple[bytes, str]]:
        """(identity key, consensus address) of every genesis validator (epoch 0's committee), as
        the consensus node takes them."""
        return [(bytes.fromhex(v.key), v.address) for v in self.validators]

    def encode(self) -> bytes:
        """Canonical JSON: what `swarmserve up` writes, byte for byte."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def chain_id(genesis_bytes: bytes) -> bytes:
    return blake3(genesis_bytes).digest()


def load_genesis(path: Path) -> tuple[Genesis, bytes]:
    """Reads and validates a genesis file; returns it and its exact bytes."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"genesis file {path}: {error.strerror or error}") from error
    try:
        return Genesis.model_validate_json(raw), raw
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"genesis file {path} is invalid: {problems}") from error
