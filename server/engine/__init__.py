"""The inference engine: vLLM's OpenAI server, spawned and supervised or reached by URL."""
