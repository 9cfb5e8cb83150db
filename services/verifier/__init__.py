"""Verifier: re-execution checks of receipts, duel-and-judge, reputation (issue #6)."""
