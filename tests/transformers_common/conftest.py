"""Registers the pytest marks that transformers' common test files put on their tests (transformers' own
conftest.py, not in its sdist, registers them there), so that pytest does not warn about unknown marks."""

TRANSFORMERS_TEST_MARKS = {
    "accelerate_tests": "transformers: needs accelerate and an accelerator",
    "flash_attn_test": "transformers: FlashAttention 2 test",
    "flash_attn_3_test": "transformers: FlashAttention 3 test",
    "flash_attn_4_test": "transformers: FlashAttention 4 test",
    "torch_compile_test": "transformers: torch.compile test",
    "is_training_test": "transformers: training test (RUN_TRAINING_TESTS)",
    "is_pipeline_test": "transformers: pipeline test (RUN_PIPELINE_TESTS)",
    "is_staging_test": "transformers: Hub staging test",
    "slow": "transformers: slow test (RUN_SLOW)",
    "order": "transformers: run order (pytest-order)",
}


def pytest_configure(config):
    for name, description in TRANSFORMERS_TEST_MARKS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
