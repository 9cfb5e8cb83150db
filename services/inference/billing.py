"""What a provider that follows the ledger's chain asks of its callers. A provider that bills
(a non-zero price) sells payment tokens for cheques (``tokens.py``; the cheques settle on the
chain, swarmserve/chain/payments.py), while a buyer's cheques cover all but
``max_unpaid_credits`` of the tokens sold to it, and each request pays its bound (prompt and
max_new_tokens at the node's price) in tokens, which name nobody. Callers that spend from the
provider's own account sign their requests and are served free; under ``accept_callers:
min_balance`` callers also sign, and their account must hold ``min_caller_balance``."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from services.inference.config import ProviderPolicy
from services.inference.tokens import TokenDesk
from swarmserve import native
from swarmserve.chain import ChainReplica
from swarmserve.chain.cheques import ChequeError, open_cheque
from swarmserve.chain.payments import price_credits, tokens_for
from swarmserve.rpc import FailedPrecondition, InvalidArgument, PermissionDenied
from swarmserve.v1 import chain_pb2, common_pb2

__all__ = ["Billing", "refuse_without_ledger"]


def refuse_without_ledger(policy: ProviderPolicy, caller: bytes) -> None:
    """The caller checks of a node that follows no chain: it cannot know anyone's balance."""
    if policy.accept_callers == "min_balance":
        raise PermissionDenied(
            f"this node serves only callers holding {policy.min_caller_balance} credits, and follows no ledger"
        )


class Billing:
    """Thread-safe: callers run it off the event loop."""

    def __init__(self, chain: ChainReplica, price: common_pb2.Price, policy: ProviderPolicy, desk: TokenDesk) -> None:
        self.chain = chain
        self.price = price
        self.policy = policy
        self.desk = desk
        self._selling = threading.Lock()

    @property
    def requires_caller(self) -> bool:
        """Whether requests must name their caller: only to check its balance (min_balance)."""
        return self.policy.accept_callers == "min_balance"

    @property
    def bills(self) -> bool:
        return bool(self.price.credits_per_1k_prompt_tokens or self.price.credits_per_1k_completion_tokens)

    def admit(self, caller: bytes) -> None:
        """Raises PermissionDenied if this node's policy does not serve ``caller`` now."""
        if self.policy.accept_callers == "min_balance":
            minimum = self.policy.min_caller_balance
            if not caller:
                raise PermissionDenied(
                    f"this node serves only callers that sign their requests with a key holding {minimum} credits"
                )
            balance = self.chain.state.account(caller).available
            if balance < minimum and not self.chain.same_account(caller):
                raise PermissionDenied(f"the caller holds {balance} credits; this node's minimum is {minimum}")

    def tokens_needed(self, caller: bytes, prompt_tokens: int, max_new_tokens: int) -> int:
        """Payment tokens a request must carry: its bound at this node's price (none for the
        node's own account, which signs as the caller, or when the node bills nobody)."""
        if not self.bills or (caller and self.chain.same_account(caller)):
            return 0
        return tokens_for(price_credits(self.price, prompt_tokens, max_new_tokens), self.desk.credits_per_token)

    def sell(self, signed: chain_pb2.SignedCheque, blinded: Sequence[bytes]) -> tuple[list[bytes], bytes]:
        """Tokens for a cheque: the cheque must leave the buyer owing at most max_unpaid_credits
        once the tokens are counted. The buyer is known here, and only here."""
        if not self.bills:
            raise FailedPrecondition("this node bills nobody and sells no tokens")
        if not 1 <= len(blinded) <= native.TOKEN_BATCH_MAX:
            raise InvalidArgument(f"buy 1 to {native.TOKEN_BATCH_MAX} tokens at once, not {len(blinded)}")
        try:
            payer = open_cheque(signed, self.chain.state.chain_id).payer
            self.chain.inbox.deposit(signed)
        except ChequeError as error:
            raise InvalidArgument(f"the cheque is refused: {error}") from None
        cost = len(blinded) * self.desk.credits_per_token
        with self._selling:
            unpaid = self.chain.inbox.unpaid(payer)
            if unpaid + cost > self.policy.max_unpaid_credits:
                raise PermissionDenied(
                    f"the cheque leaves {unpaid + cost} credits unpaid with these tokens; this node sells while "
                    f"at most {self.policy.max_unpaid_credits} are"
                )
            self.chain.inbox.served(payer, cost)
        return self.desk.issue(blinded)
