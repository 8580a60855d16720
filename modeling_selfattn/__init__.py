"""selfattn: the multi-head self-attention Transformer as a transformers model family.

Importing this package registers `model_type="selfattn"` with transformers (see registration.py). The modules:

- shipped with every saved model (they import only each other): `config.py`, `model.py`, `input_checks.py`,
  `kernels.py` (the linear layers' kernel for CPU float32 inference: oneDNN or nn.Linear's own, timed per shape),
  `dropout.py` (dropout masks drawn faster on the CPU), `quantization.py` (`model.quantize`), `scratch.py`
  (per-thread scratch buffers),
  `lean_generation.py` (generate()'s per-step work on the scores and the cache, leaner), `packing.py`, `hub.py`,
  `heads.py`, `argument_values.py` (integer values and name lists in refusals);
- package-only: `checkpoints.py` (conversion of BERT-family and Marian/BART checkpoints, export, verification,
  warm starts), `convert_cli.py` (the selfattn-convert command), `onnx_export.py` (selfattn-convert onnx),
  `head_importance.py` (which heads to prune), `fast_paths.py` (opt-in compiled decoding), `registration.py`,
  `pipelines.py`, `visualize.py`.
"""

from . import model
from .config import SelfAttnConfig
from .heads import HEADS
from .model import SelfAttnPreTrainedModel
from .registration import register

# The head classes under the package's name (`from modeling_selfattn import SelfAttnForMaskedLM`).
globals().update({head.class_name: getattr(model, head.class_name) for head in HEADS})

register()

__all__ = ["SelfAttnConfig", "SelfAttnPreTrainedModel", *(head.class_name for head in HEADS), "register"]
