"""The overlay simulation (bench/overlay_sim.py) keeps working and keeps its basic shape: it runs
the router's own dispatch code, so a regression there shows here."""

from __future__ import annotations

from bench.overlay_sim import gossip_rounds, simulate


def test_overlay_dispatch_beats_the_blind_baselines_under_load() -> None:
    results = {
        p: simulate(p, load=0.9, requests_count=600) for p in ("overlay", "round-robin", "local-only", "central-oracle")
    }
    assert results["overlay"]["mean_latency_s"] < 0.6 * results["round-robin"]["mean_latency_s"]
    assert results["overlay"]["mean_latency_s"] < 0.1 * results["local-only"]["mean_latency_s"]
    assert results["overlay"]["slo_attainment"] >= results["round-robin"]["slo_attainment"]
    assert results["central-oracle"]["mean_latency_s"] <= results["overlay"]["mean_latency_s"] * 1.05


def test_membership_news_spreads_in_logarithmic_rounds() -> None:
    assert gossip_rounds(10) <= gossip_rounds(10_000) <= 20
