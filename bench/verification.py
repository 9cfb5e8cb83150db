"""Verification: honest providers against cheating ones, with real llama.cpp nodes (the embedded
SmolLM2 model) on loopback, real signatures and a real ledger chain, in one run.

1. Re-execution checks (``Verifier.CheckReceipt``): a provider node serves, a verifier node
   re-executes. Cheats: a Q2_K re-quantization claiming to be the Q4_1 model (greedy and at
   temperature 0.7), random tokens, an answer replayed from another prompt, an early stop. Per
   cheat: detection rate over trials, requests until the first failed check. Honest: false
   accusations over ``--honest`` requests (half greedy, half at temperature 0.7).
2. Duels (``Verifier.Judge``): the honest provider against the Q2_K one at temperature 0.7,
   three judges with their own identities on the verifier's model: two honest, one that always
   votes for the answer shown first, then one that always votes for the cheater. Reported: the
   share of duels the cheater lost, and duels until each biased judge is untrusted.
3. Cost: serving time against check and judging time per request, and the verification compute
   share at the default rates (``AUDIT_RATE`` of requests audited, the router's default duel
   rate, three judges). Target: at most 10%.
4. Credits over time: a router, a verifier and three providers (fast honest, slow honest, Q2_K
   cheater), each its own account on a ledger chain, duels on a quarter of the requests and
   audits of a quarter (the users consent); each provider's credits (available + bonded) on the
   chain after every request (paid by cheque, settled per epoch; PNG).

Writes bench/results/verification.json and verification.png. Run: `make bench`
(``--quick`` for a smoke run that writes nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from grpc import aio
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.inference.config import InferenceConfig, ModelSettings, ProviderPolicy  # noqa: E402
from services.inference.engine import ChatTurn, Engine, GeneratedToken, Sampling  # noqa: E402
from services.inference.models import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402
from services.inference.node import InferenceNode  # noqa: E402
from services.router.config import AuditSettings, DuelSettings, RouterConfig  # noqa: E402
from services.router.node import RouterNode  # noqa: E402
from services.verifier.adversaries import (  # noqa: E402
    BiasedJudge,
    ClaimingEngine,
    EarlyStopEngine,
    RandomTokensEngine,
    ReplayingEngine,
    challenge_prompt,
    requantize_q2k,
)
from services.verifier.service import DuelSide, VerifierService  # noqa: E402
from swarmserve import native  # noqa: E402
from swarmserve.chain import ChainParameters, Genesis, GenesisAccount, GenesisValidator  # noqa: E402
from swarmserve.client import generate  # noqa: E402
from swarmserve.config import GossipSettings, LedgerSettings, ServerSettings  # noqa: E402
from swarmserve.keys import NodeKeys  # noqa: E402
from swarmserve.swarm import free_port_block  # noqa: E402
from swarmserve.trust import ReputationBook, verdict_scores  # noqa: E402
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, verifier_pb2, verifier_pb2_grpc  # noqa: E402
from swarmserve.verdicts import decide_duel, open_verdict  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NEW_TOKENS = 16
AUDIT_RATE = 0.02  # share of all requests audited (consenting users x audits.rate), assumed
TRIALS = 10
MAX_REQUESTS = 20
GOSSIP = GossipSettings(probe_interval_s=0.2, probe_timeout_s=0.1, suspicion_mult=3, sync_interval_s=2)
console = Console(stderr=True)
FAIL = verifier_pb2.VERDICT_OUTCOME_FAIL


def q2k_model(path: Path) -> ModelSettings:
    return ModelSettings(name=DEFAULT_MODEL_NAME, path=path, context_length=1024)


class SlowEngine:
    """An honest engine on a slower machine: the same tokens, 40 ms later each."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, prompt_ids: Sequence[int], sampling: Sampling) -> AsyncGenerator[GeneratedToken, None]:
        async for token in self.inner.generate(prompt_ids, sampling):
            await asyncio.sleep(0.04)
            yield token


async def start_node(stack: AsyncExitStack, data_dir: Path, seeds: list[str], **overrides: Any) -> InferenceNode:
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "server": ServerSettings(listen="127.0.0.1:0", grace_period_s=1),
        "models": [ModelSettings(name=DEFAULT_MODEL_NAME, context_length=1024)],
        "policy": ProviderPolicy(max_concurrent=1, max_queue=8, max_new_tokens=256),
        "gossip": GOSSIP.model_copy(update={"seeds": seeds}),
    }
    node = InferenceNode(InferenceConfig(**(settings | overrides)))
    await node.start()
    stack.push_async_callback(node.stop, 0)
    return node


def engines(node: InferenceNode) -> dict[str, Engine]:
    assert node.servicer.service is not None
    return node.servicer.service.engines


def swap(node: InferenceNode, make: Callable[[Engine], Engine]) -> None:
    service = engines(node)
    inner = service[DEFAULT_MODEL_NAME]
    service[DEFAULT_MODEL_NAME] = make(getattr(inner, "inner", inner))


class Bench:
    """A provider node and a verifier node over gRPC (phases 1 to 3)."""

    def __init__(self, provider: InferenceNode, verifier: InferenceNode, channels: list[aio.Channel]) -> None:
        self.provider = provider
        self.verifier = verifier
        self.provider_stub = inference_pb2_grpc.InferenceStub(channels[0])
        self.verifier_stub = verifier_pb2_grpc.VerifierStub(channels[1])
        self.reference = engines(verifier)[DEFAULT_MODEL_NAME]
        self.rng = random.Random(7)

    def prompt_ids(self, text: str) -> list[int]:
        return self.reference.tokenize(self.reference.apply_chat_template([ChatTurn("user", text)]))

    async def serve(
        self, text: str, temperature: float, stub: inference_pb2_grpc.InferenceStub | None = None
    ) -> tuple[verifier_pb2.CheckReceiptRequest, float]:
        prompt_ids = self.prompt_ids(text)
        request = inference_pb2.InferenceGenerateRequest(
            model=DEFAULT_MODEL_NAME,
            prompt_tokens=inference_pb2.PromptTokens(token_ids=prompt_ids),
            sampling=common_pb2.SamplingParams(
                max_new_tokens=NEW_TOKENS, temperature=temperature, seed=self.rng.getrandbits(63)
            ),
        )
        served = verifier_pb2.CheckReceiptRequest(prompt_token_ids=prompt_ids)
        started = time.perf_counter()
        async for reply in (stub or self.provider_stub).Generate(request):
            if reply.HasField("token"):
                served.token_ids.append(reply.token.token_id)
                served.token_texts.append(reply.token.text)
            else:
                served.receipt.CopyFrom(reply.summary.receipt)
        return served, time.perf_counter() - started

    async def check(self, served: verifier_pb2.CheckReceiptRequest) -> tuple[int, float]:
        started = time.perf_counter()
        verdict = open_verdict(await self.verifier_stub.CheckReceipt(served))
        return verdict.outcome, time.perf_counter() - started


async def honest_checks(bench: Bench, count: int, progress: Progress) -> dict[str, Any]:
    task = progress.add_task("honest requests, checked", total=count)
    accused = 0
    outcomes: dict[str, int] = {}
    serve_s = check_s = 0.0
    tokens = 0
    for i in range(count):
        served, serving = await bench.serve(challenge_prompt(bench.rng), 0.0 if i % 2 == 0 else 0.7)
        outcome, checking = await bench.check(served)
        name = verifier_pb2.VerdictOutcome.Name(outcome)
        outcomes[name] = outcomes.get(name, 0) + 1
        accused += outcome == FAIL
        serve_s += serving
        check_s += checking
        tokens += len(served.token_ids)
        progress.advance(task)
    return {
        "requests": count,
        "false_accusations": accused,
        "outcomes": outcomes,
        "tokens": tokens,
        "serve_s_per_request": serve_s / count,
        "check_s_per_request": check_s / count,
    }


async def cheat_detection(
    bench: Bench,
    stub: inference_pb2_grpc.InferenceStub,
    name: str,
    temperature: float,
    trials: int,
    progress: Progress,
) -> dict[str, Any]:
    """Trials of up to MAX_REQUESTS checked requests each, until the first failed check."""
    task = progress.add_task(f"cheat: {name}", total=trials)
    needed: list[int | None] = []
    failed = served_count = 0
    for _ in range(trials):
        for request in range(1, MAX_REQUESTS + 1):
            served, _ = await bench.serve(challenge_prompt(bench.rng), temperature, stub)
            outcome, _ = await bench.check(served)
            served_count += 1
            if outcome == FAIL:
                failed += 1
                needed.append(request)
                break
        else:
            needed.append(None)
        progress.advance(task)
    caught = [n for n in needed if n is not None]
    return {
        "temperature": temperature,
        "trials": trials,
        "detection_rate": len(caught) / trials,
        "requests_to_detection_mean": sum(caught) / len(caught) if caught else None,
        "requests_to_detection_max": max(caught) if caught else None,
        "failed_checks_per_request": failed / served_count,
    }


async def duels(
    bench: Bench,
    honest_stub: inference_pb2_grpc.InferenceStub,
    cheater_stub: inference_pb2_grpc.InferenceStub,
    cheater_key: bytes,
    biased: str,
    count: int,
    progress: Progress,
) -> dict[str, Any]:
    """Duels of the honest provider against the Q2_K one, three judges on the reference model."""
    get_engines = lambda: engines(bench.verifier)  # noqa: E731
    judges: list[VerifierService] = [VerifierService(native.Identity.generate(), get_engines) for _ in range(2)]
    favour = BiasedJudge.always_first if biased == "always-first" else BiasedJudge.always_for(cheater_key)
    biased_identity = native.Identity.generate()
    judges.append(BiasedJudge(biased_identity, get_engines, favour=favour))
    biased_key = biased_identity.public_key
    book = ReputationBook()
    lost = decided = 0
    untrusted_after: int | None = None
    judge_s: list[float] = []
    task = progress.add_task(f"duels, judge {biased}", total=count)
    for index in range(count):
        text = challenge_prompt(bench.rng)
        answers = [(await bench.serve(text, 0.7, stub))[0] for stub in (honest_stub, cheater_stub)]
        sides = [DuelSide(a.receipt, list(a.token_ids), list(a.token_texts)) for a in answers]
        votes = []
        for judge in judges:
            if judge is judges[2] and not book.standing(biased_key).trusted:
                continue  # an untrusted judge is not drawn
            shown = sides if bench.rng.random() < 0.5 else sides[::-1]
            started = time.perf_counter()
            votes.append(await judge.judge(f"duel-{biased}-{index}", [ChatTurn("user", text)], *shown))
            if judge is not judges[2]:
                judge_s.append(time.perf_counter() - started)
        progress.advance(task)
        result = decide_duel(f"duel-{biased}-{index}", votes)  # as the router decides and replicas recheck
        if result is None:
            continue
        for key, score, failed in verdict_scores(result):
            book.record(key, score, failed=failed)
        decided += 1
        lost += result.opponent_key == cheater_key
        if untrusted_after is None and not book.standing(biased_key).trusted:
            untrusted_after = index + 1
    return {
        "duels": count,
        "decided": decided,
        "cheater_lost_share": lost / decided if decided else None,
        "biased_judge": biased,
        "biased_judge_untrusted_after_duels": untrusted_after,
        "judge_s_per_vote": sum(judge_s) / len(judge_s) if judge_s else None,
    }


NODES = ("verifier", "fast", "slow", "cheater", "router")


async def credits_over_time(directory: Path, q2k: Path, requests: int, progress: Progress) -> dict[str, Any]:
    """A router, a verifier and three providers, each its own account on a ledger chain (the
    router and the verifier validate); credits of each provider after each request."""
    keys = {n: NodeKeys.load_or_create(directory / n).identity.public_key.hex() for n in NODES}
    base = free_port_block(2)
    genesis = Genesis(
        name="bench verification",
        created_unix_ms=1,
        validators=[
            GenesisValidator(key=keys[n], address=f"127.0.0.1:{base + i}") for i, n in enumerate(("verifier", "router"))
        ],
        accounts=[
            GenesisAccount(key=k, credits=1000 if n == "router" else 100, bonded=0 if n == "router" else 50)
            for n, k in keys.items()
        ],
        parameters=ChainParameters(block_interval_ms=200, epoch_blocks=10, appeal_blocks=10),
    )
    (directory / "genesis.json").write_bytes(genesis.encode())
    ledger = LedgerSettings(genesis=directory / "genesis.json")
    async with AsyncExitStack() as stack:
        verifier = await start_node(
            stack,
            directory / "verifier",
            [],
            ledger=ledger,
            models=[ModelSettings(name="reference-copy", context_length=1024)],
        )
        seeds = [verifier.address]
        fast = await start_node(stack, directory / "fast", seeds, ledger=ledger)
        slow = await start_node(stack, directory / "slow", seeds, ledger=ledger)
        cheater = await start_node(
            stack,
            directory / "cheater",
            seeds,
            ledger=ledger,
            models=[ModelSettings(name=DEFAULT_MODEL_NAME, path=q2k, context_length=1024)],
        )
        claimed = engines(fast)[DEFAULT_MODEL_NAME].identity
        swap(slow, SlowEngine)  # type: ignore[arg-type]
        swap(cheater, lambda inner: ClaimingEngine(inner, claimed))
        router = RouterNode(
            RouterConfig(
                data_dir=directory / "router",
                server=ServerSettings(listen="127.0.0.1:0", grace_period_s=1),
                gossip=GOSSIP.model_copy(update={"seeds": seeds}),
                default_hops=0,
                duels=DuelSettings(rate=0.25),
                audits=AuditSettings(rate=0.25),
                ledger=ledger,
            )
        )
        await router.start()
        stack.push_async_callback(router.stop, 0)
        providers = {"fast honest": fast, "slow honest": slow, "Q2_K cheater": cheater}
        await asyncio.sleep(3)  # gossip and the ledgers' first anti-entropy rounds
        series: dict[str, list[int]] = {name: [] for name in providers}
        rng = random.Random(11)
        task = progress.add_task("credits over time", total=requests)
        for _ in range(0, requests, 2):  # two users at a time, so a busy provider is passed over
            await asyncio.gather(
                *(
                    generate(
                        router.address,
                        prompt,
                        model=DEFAULT_MODEL_NAME,
                        max_tokens=NEW_TOKENS,
                        temperature=0.7,
                        allow_audit=True,
                    )
                    for prompt in (challenge_prompt(rng), challenge_prompt(rng))
                )
            )
            assert router.chain is not None
            for name, node in providers.items():
                account = router.chain.state.account(node.keys.identity.public_key)
                series[name].append(account.available + account.bonded + account.unbonding)
            progress.advance(task, 2)
        book = router.trust.book()
        return {
            "requests": requests,
            "series": series,
            "final_reputation": {
                name: round(book.standing(n.keys.identity.public_key).score, 3) for name, n in providers.items()
            },
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch, Progress(console=console) as progress:
        directory = Path(scratch)
        q2k = requantize_q2k(default_model_path(), directory / "q2k.gguf")
        async with AsyncExitStack() as stack:
            verifier = await start_node(stack, directory / "verifier", [])
            seeds = [verifier.address]
            honest = await start_node(stack, directory / "honest", seeds)
            cheater = await start_node(stack, directory / "cheater", seeds)
            requantized = await start_node(stack, directory / "q2k", seeds, models=[q2k_model(q2k)])
            claimed = engines(verifier)[DEFAULT_MODEL_NAME].identity
            swap(requantized, lambda inner: ClaimingEngine(inner, claimed))  # type: ignore[arg-type]
            channels = [aio.insecure_channel(n.address) for n in (honest, verifier, cheater, requantized)]
            for channel in channels:
                stack.push_async_callback(channel.close)
            bench = Bench(honest, verifier, channels[:2])
            cheater_stub, q2k_stub = (inference_pb2_grpc.InferenceStub(c) for c in channels[2:])
            honest_figures = await honest_checks(bench, args.honest, progress)
            cheats = {
                "q2k-greedy": await cheat_detection(bench, q2k_stub, "Q2_K, greedy", 0.0, args.trials, progress),
                "q2k-t0.7": await cheat_detection(bench, q2k_stub, "Q2_K, T=0.7", 0.7, args.trials, progress),
            }
            for name, make in (
                ("random-tokens", RandomTokensEngine),
                ("replayed-answer", ReplayingEngine),
                ("early-stop", EarlyStopEngine),
            ):
                swap(cheater, lambda inner, make=make: make(inner, claimed))  # type: ignore[misc]
                cheats[name] = await cheat_detection(bench, cheater_stub, name, 0.7, args.trials, progress)
            cheater_key = requantized.keys.identity.public_key
            judged = {
                biased: await duels(bench, bench.provider_stub, q2k_stub, cheater_key, biased, args.duels, progress)
                for biased in ("always-first", "always-for-the-cheater")
            }
        serve_s = honest_figures["serve_s_per_request"]
        check_s = honest_figures["check_s_per_request"]
        judge_s = judged["always-first"]["judge_s_per_vote"] or 0.0
        duel_rate = DuelSettings().rate
        judges = ChainParameters().judges_per_duel
        # An audit is a check of a request served anyway; a duel a second request served plus
        # the judges' votes (each re-executing both answers).
        share = AUDIT_RATE * check_s / serve_s + duel_rate * (serve_s + judges * judge_s) / serve_s
        cost = {
            "serve_s_per_request": round(serve_s, 4),
            "check_s_per_request": round(check_s, 4),
            "judge_s_per_vote": round(judge_s, 4),
            "check_to_serve_ratio": round(check_s / serve_s, 3),
            "audit_rate": AUDIT_RATE,
            "duel_rate": duel_rate,
            "judges_per_duel": judges,
            "verification_share_of_serving": round(share, 4),
        }
        credits = await credits_over_time(directory / "credits", q2k, args.credit_requests, progress)
    return {"honest": honest_figures, "cheats": cheats, "duels": judged, "cost": cost, "credits": credits}


def plot(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, series in figures["credits"]["series"].items():
        ax.plot(range(1, len(series) + 1), series, label=name)
    ax.set_xlabel("pairs of concurrent requests served by the swarm")
    ax.set_ylabel("credits (available + staked)")
    ax.set_title("Provider credits over time (on the ledger's chain, settled per epoch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(figures: dict[str, Any]) -> None:
    table = Table(title="Verification")
    for column in ("cheat", "detection rate", "requests to detection (mean/max)", "failed checks per request"):
        table.add_column(column)
    for name, cheat in figures["cheats"].items():
        table.add_row(
            name,
            f"{cheat['detection_rate']:.0%}",
            f"{cheat['requests_to_detection_mean']} / {cheat['requests_to_detection_max']}",
            f"{cheat['failed_checks_per_request']:.2f}",
        )
    console.print(table)
    honest = figures["honest"]
    console.print(f"honest: {honest['false_accusations']} false accusations in {honest['requests']} requests")
    for biased, duel in figures["duels"].items():
        console.print(
            f"duels ({biased} judge): cheater lost {duel['cheater_lost_share']}, biased judge untrusted after "
            f"{duel['biased_judge_untrusted_after_duels']} duels"
        )
    cost = figures["cost"]
    console.print(
        f"per request: serve {cost['serve_s_per_request']:.3f} s, check {cost['check_s_per_request']:.3f} s, "
        f"judge vote {cost['judge_s_per_vote']:.3f} s; verification share of serving at the default rates: "
        f"{cost['verification_share_of_serving']:.1%}"
    )
    console.print(f"credits at the end: { {k: v[-1] for k, v in figures['credits']['series'].items()} }")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, nothing written")
    args = parser.parse_args()
    args.honest, args.trials, args.duels, args.credit_requests = (10, 2, 3, 8) if args.quick else (1000, TRIALS, 12, 60)
    started = time.monotonic()
    figures = asyncio.run(run(args))
    figures["environment"] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "new_tokens": NEW_TOKENS,
        "seconds": round(time.monotonic() - started, 1),
    }
    report(figures)
    if args.quick:
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "verification.json").write_text(json.dumps(figures, indent=2) + "\n")
    plot(figures, RESULTS / "verification.png")
    console.print(f"wrote {RESULTS / 'verification.json'} and verification.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
