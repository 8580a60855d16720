"""Stand-in for the sdist's missing `tests/generation/test_utils.py`.

`test_modeling_common.py` imports only `GenerationTesterMixin` from it, and uses it in one test:
`test_generation_tester_mixin_inheritance` checks that a test class inherits it exactly when one of its model
classes can generate. Our generating test classes inherit this empty stand-in, so that check holds; the real
mixin's `generate()` tests (greedy, sampling, beam search, assisted decoding, cache formats, ...) are left out.
The project's own tests/test_generation.py covers generation.
"""


class GenerationTesterMixin:
    """Empty: transformers' generation tests are not in its sdist, so they are left out."""
