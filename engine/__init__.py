"""The serving engine: bundle loading, tokenization, admission, batching, runtimes and task heads.

It knows nothing of HTTP or gRPC: transports call `engine.service.Service` with typed requests.
"""
