"""``llmctl serve``: an OpenAI-compatible HTTP server over llmctl's backends (protocol, engine, app)."""
