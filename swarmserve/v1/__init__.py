"""Generated gRPC and protobuf modules for the ``swarmserve.v1`` API.

The ``*_pb2.py``, ``*_pb2_grpc.py`` and ``.pyi`` files beside this one are written by
``make proto`` from ``proto/swarmserve/v1/*.proto``. Never edit them by hand.
"""
