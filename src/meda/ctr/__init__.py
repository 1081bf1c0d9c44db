"""meda.ctr: multi-epoch CTR training with embedding re-initialisation (MEDA)."""
