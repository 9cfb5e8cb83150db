"""Cheques and shared accounts in the ledger's state machine (swarmserve/chain/state.py,
cheques.py), on blocks built here: a cheque settles once per epoch per pair and pays only what
it adds to the last settlement (an old or replayed cheque pays nothing); a payer that cannot
afford a cheque pays what it has and owes the rest; one transaction settles many cheques, each
judged alone; forged, altered and other chains' cheques pay nothing; an operator's nodes spend from and earn into one account, cheques among them are
refused (own users are free), and nobody joins an account without both signatures."""

from __future__ import annotations

from swarmserve import native
from swarmserve.chain import Genesis, GenesisAccount, GenesisValidator, sign_transaction
from swarmserve.chain.cheques import ChequeError, open_cheque, sign_cheque
from swarmserve.chain.genesis import ChainParameters
from swarmserve.chain.state import MEMBER_CONSENT
from swarmserve.v1 import chain_pb2
from tests.chainkit import Chain

VALIDATOR = native.Identity.from_seed(b"\x01" * 32)
OPERATOR_A, ROUTER_A, NODE_A = (native.Identity.from_seed(bytes([i]) * 32) for i in (20, 21, 22))
OPERATOR_B, ROUTER_B, NODE_B = (native.Identity.from_seed(bytes([i]) * 32) for i in (30, 31, 32))
STRANGER = native.Identity.from_seed(b"\x28" * 32)
EPOCH = 5
GENESIS = Genesis(
    name="payments",
    created_unix_ms=1,
    validators=[GenesisValidator(key=VALIDATOR.public_key.hex(), address="127.0.0.1:7400")],
    accounts=[
        GenesisAccount(
            key=OPERATOR_A.public_key.hex(),
            credits=100,
            members=[ROUTER_A.public_key.hex(), NODE_A.public_key.hex()],
        ),
        GenesisAccount(key=OPERATOR_B.public_key.hex(), credits=20, members=[ROUTER_B.public_key.hex()]),
    ],
    parameters=ChainParameters(epoch_blocks=EPOCH),
)


def settle(submitter: native.Identity, nonce: int, cheque: chain_pb2.SignedCheque, chain_id: bytes) -> bytes:
    return sign_transaction(submitter, chain_id, nonce, settle=chain_pb2.SettleCheques(cheques=[cheque]))


def available(chain: Chain, identity: native.Identity) -> int:
    return chain.state.account(identity.public_key).available


def test_cheques_settle_once_per_epoch_for_what_they_add() -> None:
    chain = Chain(GENESIS)
    payee = NODE_B.public_key  # B's new node, not yet a member: paid into its own key
    first = sign_cheque(ROUTER_A, chain.chain_id, payee, 7)
    second = sign_cheque(ROUTER_A, chain.chain_id, payee, 12)
    chain.block([settle(NODE_B, 1, first, chain.chain_id)])
    assert available(chain, NODE_B) == 7 and available(chain, OPERATOR_A) == 93  # A's router paid from A's account
    # The same epoch again: refused, even for a larger cheque.
    chain.block([settle(NODE_B, 2, second, chain.chain_id)])
    assert available(chain, NODE_B) == 7
    assert chain.state.settled(ROUTER_A.public_key, payee) == (7, 0)
    chain.until(EPOCH)  # the next epoch: the old cheque adds nothing, the newer one adds 5
    chain.block([settle(NODE_B, 3, first, chain.chain_id), settle(STRANGER, 1, second, chain.chain_id)])
    assert available(chain, NODE_B) == 12 and available(chain, OPERATOR_A) == 88  # anyone may submit it
    chain.until(2 * EPOCH)
    chain.block([settle(NODE_B, 4, second, chain.chain_id)])  # replayed a later epoch: pays nothing
    assert available(chain, NODE_B) == 12
    assert len(chain.roots()) == 1


def test_a_payer_that_cannot_afford_a_cheque_pays_what_it_has_and_owes_the_rest() -> None:
    chain = Chain(GENESIS)
    cheque = sign_cheque(ROUTER_B, chain.chain_id, NODE_A.public_key, 30)
    chain.block([settle(NODE_A, 1, cheque, chain.chain_id)])
    assert available(chain, OPERATOR_B) == 0 and available(chain, OPERATOR_A) == 120  # NODE_A earns into A
    assert chain.state.settled(ROUTER_B.public_key, NODE_A.public_key) == (20, 0)
    chain.block([sign_transaction(OPERATOR_A, chain.chain_id, 1, transfer=transfer(OPERATOR_B, 15))])
    chain.until(EPOCH)
    chain.block([settle(NODE_A, 2, cheque, chain.chain_id)])
    assert available(chain, OPERATOR_B) == 5 and chain.state.settled(ROUTER_B.public_key, NODE_A.public_key)[0] == 30


def transfer(to: native.Identity, credits: int) -> chain_pb2.TransferCredits:
    return chain_pb2.TransferCredits(recipient_key=to.public_key, credits=credits)


def test_forged_altered_foreign_and_own_account_cheques_pay_nothing() -> None:
    chain = Chain(GENESIS)
    forged = sign_cheque(STRANGER, chain.chain_id, NODE_B.public_key, 50)
    forged.cheque = chain_pb2.Cheque(
        chain_id=chain.chain_id, payer_key=ROUTER_A.public_key, payee_key=NODE_B.public_key, cumulative_credits=50
    ).SerializeToString()  # claims A's router signed it
    altered = sign_cheque(ROUTER_A, chain.chain_id, NODE_B.public_key, 1)
    body = chain_pb2.Cheque.FromString(altered.cheque)
    body.cumulative_credits = 90
    altered.cheque = body.SerializeToString()
    foreign = sign_cheque(ROUTER_A, b"\x02" * 32, NODE_B.public_key, 50)
    own = sign_cheque(ROUTER_A, chain.chain_id, NODE_A.public_key, 50)  # A's router pays A's node
    for cheque, why in ((forged, "signature"), (altered, "signature"), (foreign, "another chain")):
        try:
            open_cheque(cheque, chain.chain_id)
            raise AssertionError("accepted")
        except ChequeError as error:
            assert why in str(error)
    root = chain.state.state_root
    chain.block([settle(NODE_B, n, c, chain.chain_id) for n, c in enumerate((forged, altered, foreign), 1)])
    chain.block([settle(NODE_A, 1, own, chain.chain_id)])
    assert available(chain, OPERATOR_A) == 100 and available(chain, NODE_B) == 0
    assert chain.state.settled(ROUTER_A.public_key, NODE_A.public_key) == (0, -1)
    assert root != chain.state.state_root  # only the nonces moved
    assert chain.state.account(NODE_B.public_key).nonce == 3


def test_members_spend_and_earn_for_their_account_and_join_only_with_both_signatures() -> None:
    chain = Chain(GENESIS)
    state = chain.state
    # A member's transfer and bond move its account's credits; its nonce is its own.
    chain.block(
        [
            sign_transaction(ROUTER_A, chain.chain_id, 1, transfer=transfer(NODE_B, 10)),
            sign_transaction(NODE_A, chain.chain_id, 1, bond=chain_pb2.BondStake(credits=40)),
        ]
    )
    account = state.account(NODE_A.public_key)
    assert (account.available, account.bonded, account.nonce, account.account_key) == (
        50,
        40,
        1,
        OPERATOR_A.public_key,
    )
    assert state.account(OPERATOR_A.public_key).nonce == 0
    # NODE_B holds 10 credits of its own: it cannot become a member (they would be stranded).
    consent = NODE_B.sign(MEMBER_CONSENT + chain.chain_id + OPERATOR_B.public_key)
    join = chain_pb2.AddMember(member_key=NODE_B.public_key, consent=consent)
    chain.block([sign_transaction(OPERATOR_B, chain.chain_id, 1, add_member=join)])
    assert state.account_of(NODE_B.public_key) == NODE_B.public_key
    chain.block([sign_transaction(NODE_B, chain.chain_id, 1, transfer=transfer(OPERATOR_B, 10))])
    # Without the member's consent (or with consent for another account): refused.
    wrong = chain_pb2.AddMember(
        member_key=NODE_B.public_key, consent=NODE_B.sign(MEMBER_CONSENT + chain.chain_id + OPERATOR_A.public_key)
    )
    chain.block([sign_transaction(OPERATOR_B, chain.chain_id, 2, add_member=wrong)])
    assert state.account_of(NODE_B.public_key) == NODE_B.public_key
    # An account cannot enrol a member of another account, and a member cannot enrol anyone.
    steal = chain_pb2.AddMember(
        member_key=ROUTER_A.public_key,
        consent=ROUTER_A.sign(MEMBER_CONSENT + chain.chain_id + OPERATOR_B.public_key),
    )
    chain.block(
        [
            sign_transaction(OPERATOR_B, chain.chain_id, 3, add_member=steal),
            sign_transaction(ROUTER_B, chain.chain_id, 1, add_member=join),
        ]
    )
    assert state.account_of(ROUTER_A.public_key) == OPERATOR_A.public_key
    # With both signatures and nothing held: a member; what it is paid goes to the account.
    chain.block([sign_transaction(OPERATOR_B, chain.chain_id, 4, add_member=join)])
    assert state.account_of(NODE_B.public_key) == OPERATOR_B.public_key
    before = available(chain, OPERATOR_B)
    chain.block([sign_transaction(ROUTER_A, chain.chain_id, 2, transfer=transfer(NODE_B, 5))])
    assert available(chain, OPERATOR_B) == before + 5
    # Removed by its account only: then it spends its own (empty) account again.
    leave = chain_pb2.RemoveMember(member_key=NODE_B.public_key)
    chain.block([sign_transaction(OPERATOR_A, chain.chain_id, 1, remove_member=leave)])
    assert state.account_of(NODE_B.public_key) == OPERATOR_B.public_key
    chain.block([sign_transaction(OPERATOR_B, chain.chain_id, 5, remove_member=leave)])
    assert state.account_of(NODE_B.public_key) == NODE_B.public_key and available(chain, NODE_B) == 0
    assert len(chain.roots()) == 1


def test_one_transaction_settles_many_cheques_each_judged_alone() -> None:
    chain = Chain(GENESIS)
    payee = NODE_B.public_key
    forged = sign_cheque(STRANGER, chain.chain_id, payee, 50)
    forged.cheque = chain_pb2.Cheque(
        chain_id=chain.chain_id, payer_key=ROUTER_A.public_key, payee_key=payee, cumulative_credits=50
    ).SerializeToString()
    batch = [
        forged,  # pays nothing, spoils nothing
        sign_cheque(ROUTER_A, chain.chain_id, payee, 6),
        sign_cheque(ROUTER_A, chain.chain_id, payee, 9),  # the same pair again this epoch: refused
        sign_cheque(ROUTER_B, chain.chain_id, payee, 4),
    ]
    settle = chain_pb2.SettleCheques(cheques=batch)
    chain.block([sign_transaction(NODE_B, chain.chain_id, 1, settle=settle)])
    assert available(chain, NODE_B) == 10
    assert chain.state.settled(ROUTER_A.public_key, payee) == (6, 0)
    assert chain.state.settled(ROUTER_B.public_key, payee) == (4, 0)
    # A batch of which nothing pays fails (the nonce is spent, nothing else moves).
    chain.block([sign_transaction(NODE_B, chain.chain_id, 2, settle=chain_pb2.SettleCheques(cheques=[forged]))])
    assert available(chain, NODE_B) == 10 and chain.state.account(NODE_B.public_key).nonce == 2
    assert len(chain.roots()) == 1
