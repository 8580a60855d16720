"""transformers' ModelTesterMixin (and TrainingTesterMixin) on the encoder-decoder selfattn classes."""

import unittest

from modeling_selfattn import SelfAttnConfig, SelfAttnForConditionalGeneration, SelfAttnModel

from .sdist import CommonTestsUnavailable, load_common_tests, unavailable_test
from .testers import (
    SelfAttnCommonTestSettings,
    SelfAttnEncoderDecoderModelTester,
    SelfAttnTrainingSettings,
    config_tester_kwargs,
)

try:
    hf = load_common_tests()
except CommonTestsUnavailable as error:
    test_transformers_common_tests_available = unavailable_test(error)
else:
    training_mixin = (hf.TrainingTesterMixin,) if hf.has_training_mixin else ()

    class SelfAttnEncoderDecoderModelTest(
        SelfAttnCommonTestSettings,
        SelfAttnTrainingSettings,
        hf.ModelTesterMixin,
        hf.GenerationTesterMixin,
        *training_mixin,
        unittest.TestCase,
    ):
        all_model_classes = (SelfAttnModel, SelfAttnForConditionalGeneration)
        is_encoder_decoder = True

        def setUp(self):
            self.model_tester = SelfAttnEncoderDecoderModelTester(self, hf)
            self.config_tester = hf.ConfigTester(
                self, config_class=SelfAttnConfig, **config_tester_kwargs("encoder_decoder")
            )

        def test_training_overfit(self):
            self.skipTest(
                reason="TrainingTesterMixin.test_training_overfit judges the trained model by generate() continuing "
                "the first training token given as the prompt and expects the training sequence back, which only a "
                "decoder-only model does: an encoder-decoder encodes the prompt and starts its output with "
                "decoder_start_token_id (the decoder-only test class runs this test)."
            )
