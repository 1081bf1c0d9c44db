"""meda: MEDA for long-context inference (``meda.kv``) and CTR training (``meda.ctr``).

The two engines share the CLI and reporting helpers and nothing else; neither
imports the other. Import the engine you need: ``from meda.kv import compress``.
"""

__version__ = "0.1.0"
