"""vattention.server: an OpenAI-compatible HTTP server (`vattention serve`), like `vllm serve`.

    HTTP handler (app.py, on the asyncio loop): validate (protocol.py), tokenize, check the
        engine's limits ── add / abort ──> AsyncEngine command queue (async_engine.py)
    engine thread: drain commands, LLMEngine.step() while work exists, else block on the queue
        ── RequestOutput (streamed: a delta; else one at the end) ──> the request's RequestStream
    HTTP handler: Generation + DeltaTracker (stream.py) frame the deltas ──> SSE chunks, or one
        JSON body; errors.py turns every failure into OpenAI's error envelope

Who owns what: the engine thread alone builds, steps and closes the LLMEngine (it is not
thread-safe); the event loop owns the HTTP connections and the per-request queues; metrics.py reads
the engine thread's published engine.stats() snapshot, never the engine. A client that disconnects
aborts its request, which frees its KV memory at the engine thread's next command drain.
cli.py builds the configs from flags and runs uvicorn; SIGTERM stops accepting, lets in-flight
requests finish for --shutdown-timeout-s, aborts the rest and closes the engine.
"""
