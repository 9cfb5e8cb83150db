"""The credit ledger's chain: the genesis file, signed transactions, and the deterministic state
machine every node applies to the finalized blocks of the validators' consensus
(:class:`swarmserve.native.ConsensusNode`)."""

from swarmserve.chain.genesis import ChainParameters, Genesis, GenesisAccount, GenesisValidator, chain_id, load_genesis
from swarmserve.chain.proof import BlockProofError, ChainView, proven_blocks
from swarmserve.chain.replica import ChainReplica
from swarmserve.chain.servicer import chain_binding
from swarmserve.chain.state import Account, AppliedBlock, ChainState, StateError, genesis_block
from swarmserve.chain.transactions import Transaction, TransactionError, decode_transaction, sign_transaction

__all__ = [
    "Account",
    "AppliedBlock",
    "BlockProofError",
    "ChainParameters",
    "ChainReplica",
    "ChainState",
    "ChainView",
    "Genesis",
    "GenesisAccount",
    "GenesisValidator",
    "StateError",
    "Transaction",
    "TransactionError",
    "chain_binding",
    "chain_id",
    "decode_transaction",
    "genesis_block",
    "load_genesis",
    "proven_blocks",
    "sign_transaction",
]
