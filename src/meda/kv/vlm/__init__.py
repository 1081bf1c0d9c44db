"""``meda-vlm-mini``: the project's reference vision-language model, trained by its own script.

* :mod:`meda.kv.vlm.architecture`: the LLaVA model (SmolLM2-135M-Instruct + small CLIP tower + projector,
  LoRA adapter), its processor, and which weights are trained;
* :mod:`meda.kv.vlm.weights`: the shipped weights (``meda-vlm-mini/`` beside this file, without SmolLM2's
  weights) and their assembly with SmolLM2 into a loadable checkpoint;
* :mod:`meda.kv.vlm.train`: the training script (``python -m meda.kv.vlm.train --help``);
* :mod:`meda.kv.vlm.assemble`: trained weights into a checkpoint folder (then ``meda kv eval --model DIR``).

Load it like any model: ``meda.kv.models.load_model("meda-vlm-mini")``.
"""

ALIAS = "meda-vlm-mini"
