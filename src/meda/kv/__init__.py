"""meda.kv: KV-cache compression (MEDA and baselines) for transformers LLMs and VLMs."""
