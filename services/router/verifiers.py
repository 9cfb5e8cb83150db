"""Which verifier nodes a router asks, for a duel's votes or an audit: the ledger's lottery draws
accounts (so neither the router nor a provider picks who checks), and the router asks, for each
drawn account, one of its live verifier nodes that holds the model and that it trusts."""

from __future__ import annotations

from collections.abc import Collection

from swarmserve.chain import ChainState
from swarmserve.overlay import Peer, PeerDirectory
from swarmserve.trust import ReputationBook
from swarmserve.v1 import common_pb2

__all__ = ["drawn_verifiers"]


def drawn_verifiers(
    state: ChainState,
    directory: PeerDirectory,
    book: ReputationBook,
    drawn: Collection[bytes],
    model_digest: bytes,
    parties: Collection[bytes],
) -> list[Peer]:
    """For each account in ``drawn``, one trusted live verifier node of it holding the model with
    ``model_digest``, never one of ``parties`` (the providers being checked)."""
    chosen: dict[bytes, Peer] = {}
    for peer in directory.alive(common_pb2.NODE_ROLE_VERIFIER):
        key = peer.descriptor.identity_key
        account = state.account_of(key)
        if (
            account in drawn
            and account not in chosen
            and key not in parties
            and any(m.weights_digest == model_digest for m in peer.descriptor.models)
            and book.standing(key).trusted
        ):
            chosen[account] = peer
    return list(chosen.values())
