"""Stand-in for the sdist's missing `tests/exporters/test_export.py`.

`test_modeling_common.py` imports only `ExportTesterMixin` from it, as the base class of `ModelTesterMixin`. The
real mixin adds the export tests (torch.export / dynamo, ONNX, OpenVINO, ExecuTorch, AOTInductor, TensorRT
exporters, with and without generate): with this empty stand-in none of them run, and the
`test_torch_exportable` flag of ModelTesterMixin has no effect.
"""


class ExportTesterMixin:
    """Empty: transformers' export tests are not in its sdist, so they are left out."""
