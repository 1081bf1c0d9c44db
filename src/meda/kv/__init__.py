"""meda.kv: KV-cache compression (MEDA and baselines) for transformers LLMs and VLMs.

>>> from meda.kv import compress
>>> with compress(model, method="meda", budget=0.2) as report:
...     out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
"""

from meda.kv.compress import compress
from meda.kv.recipes import METHODS, Recipe
from meda.kv.report import CompressionReport

__all__ = ["METHODS", "CompressionReport", "Recipe", "compress"]
