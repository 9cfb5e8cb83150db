"""The credit ledger's chain: the genesis file, signed transactions, and the deterministic state
machine every node applies to the finalized blocks of the validators' consensus
(:class:`swarmserve.native.ConsensusNode`)."""

from swarmserve.chain.genesis import ChainParameters, Genesis, GenesisAccount, GenesisValidator, chain_id, load_genesis
from swarmserve.chain.state import Account, AppliedBlock, ChainState, StateError
from swarmserve.chain.transactions import Transaction, TransactionError, decode_transaction, sign_transaction

__all__ = [
    "Account",
    "AppliedBlock",
    "ChainParameters",
    "ChainState",
    "Genesis",
    "GenesisAccount",
    "GenesisValidator",
    "StateError",
    "Transaction",
    "TransactionError",
    "chain_id",
    "decode_transaction",
    "load_genesis",
    "sign_transaction",
]
