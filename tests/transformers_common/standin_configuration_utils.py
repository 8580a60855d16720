"""Stand-in for the sdist's missing `tests/utils/test_configuration_utils.py`.

`test_configuration_common.py` imports `config_common_kwargs` from it: keyword arguments every config class must
accept and keep (`ConfigTester.check_config_arguments_init` builds a config from them and reads each back; for
`dtype` it expects `torch.float16`). Here: each field that `PreTrainedConfig` itself defines, plus
`output_attentions`, given a value other than its default.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 3,
    "architectures": ["SelfAttnForMaskedLM"],
    "id2label": {0: "negative", 1: "positive"},
    "label2id": {"negative": 0, "positive": 1},
    "problem_type": "single_label_classification",
}
