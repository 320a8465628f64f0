"""The loraplex gateway: OpenAI-compatible tenant API, admin API, engine supervision."""
