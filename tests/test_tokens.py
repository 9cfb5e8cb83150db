"""Payment tokens alone: the native VOPRF issuance and checks, and a provider's TokenDesk
(services/inference/tokens.py): tokens spent once, even across a restart, forged and foreign
ones refused, and the key seed kept private."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.inference.tokens import TokenDesk
from swarmserve import native
from swarmserve.chain.payments import tokens_for
from swarmserve.rpc import PermissionDenied


def buy(desk: TokenDesk, count: int) -> list[tuple[bytes, bytes]]:
    request = native.TokenRequest(count)
    evaluated, proof = desk.issue(request.blinded)
    return request.finalize(evaluated, proof, desk.public_key)


def test_tokens_are_spent_once_even_after_a_restart(tmp_path: Path) -> None:
    desk = TokenDesk(tmp_path, credits_per_token=2)
    tokens = buy(desk, 3)
    desk.check(tokens[:2], needed=2)
    desk.spend(tokens[:2])
    with pytest.raises(PermissionDenied, match="already spent"):
        desk.check(tokens[:2], needed=2)
    with pytest.raises(PermissionDenied, match="already spent"):
        desk.spend([tokens[1], tokens[2]])  # all or none: the third stays unspent
    desk.close()
    again = TokenDesk(tmp_path, credits_per_token=2)  # the same node, restarted
    assert again.public_key == desk.public_key and again.spent() == 2
    with pytest.raises(PermissionDenied, match="already spent"):
        again.check([tokens[0]], needed=1)
    again.check([tokens[2]], needed=1)
    again.spend([tokens[2]])
    assert again.spent() == 3
    assert os.stat(tmp_path / "token.key").st_mode & 0o777 == 0o600
    again.close()


def test_too_few_duplicated_forged_and_foreign_tokens_are_refused(tmp_path: Path) -> None:
    desk, other = TokenDesk(tmp_path / "a", 1), TokenDesk(tmp_path / "b", 1)
    mine, theirs = buy(desk, 2), buy(other, 1)
    with pytest.raises(PermissionDenied, match="needs 3"):
        desk.check(mine, needed=3)
    with pytest.raises(PermissionDenied, match="twice"):
        desk.check([mine[0], mine[0]], needed=2)
    nonce = mine[0][0]
    with pytest.raises(PermissionDenied, match="not one of this node's"):
        desk.check([(nonce, bytes(64))], needed=1)
    with pytest.raises(PermissionDenied, match="not one of this node's"):
        desk.check(theirs, needed=1)
    desk.check(mine, needed=2)


def test_a_readable_seed_is_refused_and_the_price_rounds_up(tmp_path: Path) -> None:
    TokenDesk(tmp_path, 1).close()
    os.chmod(tmp_path / "token.key", 0o644)
    with pytest.raises(native.KeyFileError):
        TokenDesk(tmp_path, 1)
    assert (tokens_for(0, 5), tokens_for(1, 5), tokens_for(5, 5), tokens_for(6, 5)) == (0, 1, 1, 2)
