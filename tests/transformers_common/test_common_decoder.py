"""transformers' ModelTesterMixin (and TrainingTesterMixin) on the decoder-only selfattn classes."""

import unittest

from modeling_selfattn import SelfAttnConfig, SelfAttnForCausalLM, SelfAttnModel

from .sdist import CommonTestsUnavailable, load_common_tests, unavailable_test
from .testers import (
    SelfAttnCommonTestSettings,
    SelfAttnDecoderModelTester,
    SelfAttnTrainingSettings,
    config_tester_kwargs,
)

try:
    hf = load_common_tests()
except CommonTestsUnavailable as error:
    test_transformers_common_tests_available = unavailable_test(error)
else:
    training_mixin = (hf.TrainingTesterMixin,) if hf.has_training_mixin else ()

    class SelfAttnDecoderModelTest(
        SelfAttnCommonTestSettings,
        SelfAttnTrainingSettings,
        hf.ModelTesterMixin,
        hf.GenerationTesterMixin,
        *training_mixin,
        unittest.TestCase,
    ):
        all_model_classes = (SelfAttnModel, SelfAttnForCausalLM)

        def setUp(self):
            self.model_tester = SelfAttnDecoderModelTester(self, hf)
            self.model_tester.causal_lm_class = SelfAttnForCausalLM  # what TrainingTesterMixin trains
            self.config_tester = hf.ConfigTester(self, config_class=SelfAttnConfig, **config_tester_kwargs("decoder"))
