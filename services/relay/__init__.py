"""Relay: serves ``Relay.Circuit``, peels or adds exactly one onion layer per cell with
``swarmserve.native.OnionKey`` and ``CircuitHop``, and knows only its neighbours (issue #4)."""
