"""The swarm's services, one package each: ``router``, ``relay``, ``inference``, ``verifier``."""
