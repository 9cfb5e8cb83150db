"""What a provider that follows the ledger's chain asks of its callers: a caller that signs its
requests (a router) pays for them with cheques (swarmserve/chain/payments.py). The provider
serves it while its cheques cover all but ``max_unpaid_credits`` of the work served to it, and,
under ``accept_callers: min_balance``, while its account holds ``min_caller_balance``. Callers
that spend from the provider's own account are served for free."""

from __future__ import annotations

from services.inference.config import ProviderPolicy
from swarmserve.chain import ChainReplica
from swarmserve.chain.payments import price_credits
from swarmserve.rpc import PermissionDenied
from swarmserve.v1 import common_pb2

__all__ = ["Billing", "refuse_without_ledger"]


def refuse_without_ledger(policy: ProviderPolicy, caller: bytes) -> None:
    """The caller checks of a node that follows no chain: it cannot know anyone's balance."""
    if policy.accept_callers == "min_balance":
        raise PermissionDenied(
            f"this node serves only callers holding {policy.min_caller_balance} credits, and follows no ledger"
        )


class Billing:
    def __init__(self, chain: ChainReplica, price: common_pb2.Price, policy: ProviderPolicy) -> None:
        self.chain = chain
        self.price = price
        self.policy = policy

    @property
    def requires_caller(self) -> bool:
        """Whether requests must name their paying caller: only when there is something to bill
        or a balance to check. Otherwise no caller identity is asked for (or sent by routers)."""
        price = self.price
        return self.policy.accept_callers == "min_balance" or bool(
            price.credits_per_1k_prompt_tokens or price.credits_per_1k_completion_tokens
        )

    def admit(self, caller: bytes) -> None:
        """Raises PermissionDenied if this node does not serve ``caller`` now."""
        if self.policy.accept_callers == "min_balance":
            minimum = self.policy.min_caller_balance
            if not caller:
                raise PermissionDenied(
                    f"this node serves only callers that sign their requests with a key holding {minimum} credits"
                )
            balance = self.chain.state.account(caller).available
            if balance < minimum and not self.chain.same_account(caller):
                raise PermissionDenied(f"the caller holds {balance} credits; this node's minimum is {minimum}")
        if not caller and self.requires_caller:
            # Serving an unsigned request would bill nobody: a router could ride for free.
            raise PermissionDenied("this node bills its callers: the request must be signed by the caller that pays")
        if caller and not self.chain.same_account(caller):
            unpaid = self.chain.inbox.unpaid(caller)
            if unpaid > self.policy.max_unpaid_credits:
                raise PermissionDenied(
                    f"the caller owes {unpaid} credits its cheques do not cover; this node serves callers "
                    f"owing at most {self.policy.max_unpaid_credits}"
                )

    def charge(self, caller: bytes, prompt_tokens: int, completion_tokens: int) -> int:
        """Counts a served stream against ``caller``; returns the credits (0 if free)."""
        if not caller or self.chain.same_account(caller):
            return 0
        credits = price_credits(self.price, prompt_tokens, completion_tokens)
        self.chain.inbox.served(caller, credits)
        return credits
