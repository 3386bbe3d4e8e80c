"""The engine as an OpenAI-compatible HTTP server (`python -m engine serve`); see docs/server.md.

app (start-up, shutdown) -> handlers (HTTP, on the event loop) -> engine_loop (the engine's own
thread) -> engine.llm_engine. protocol: the wire format; tokenizer: text <-> ids, on the HTTP side
only; prometheus: /metrics; cli: the flags.
"""
