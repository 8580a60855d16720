"""transformers' ModelTesterMixin (and TrainingTesterMixin, GenerationTesterMixin's stand-in for the generating
classes) on every selfattn class, one test class per model shape: encoder-only, encoder-decoder, decoder-only."""

import unittest

import torch

from modeling_selfattn import (
    SelfAttnConfig,
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForPreTraining,
    SelfAttnForReplacedTokenDetection,
    SelfAttnModel,
    model,
)
from modeling_selfattn.heads import HEADS

from .sdist import CommonTestsUnavailable, load_common_tests, unavailable_test
from .testers import (
    SelfAttnCommonTestSettings,
    SelfAttnDecoderModelTester,
    SelfAttnEncoderDecoderModelTester,
    SelfAttnEncoderModelTester,
    SelfAttnTrainingSettings,
    config_tester_kwargs,
)

try:
    hf = load_common_tests()
except CommonTestsUnavailable as error:
    test_transformers_common_tests_available = unavailable_test(error)
else:
    training_mixin = (hf.TrainingTesterMixin,) if hf.has_training_mixin else ()
    common_bases = (SelfAttnCommonTestSettings, SelfAttnTrainingSettings, hf.ModelTesterMixin)

    class SelfAttnEncoderModelTest(*common_bases, *training_mixin, unittest.TestCase):
        # The bare model and every encoder head of the registry, so that a new head cannot miss these tests.
        all_model_classes = (SelfAttnModel,) + tuple(
            getattr(model, head.class_name)
            for head in HEADS
            if issubclass(getattr(model, head.class_name), model.SelfAttnEncoderHeadModel)
        )

        def setUp(self):
            self.model_tester = SelfAttnEncoderModelTester(self, hf)
            self.config_tester = hf.ConfigTester(self, config_class=SelfAttnConfig, **config_tester_kwargs("encoder"))

        def _get_trainable_model_class(self):
            # TrainingTesterMixin trains the tester's causal LM or sequence classifier, else all_model_classes[0]
            # (the bare model, which has no loss). Its batch has labels = input_ids, which fits the masked-LM head.
            return SelfAttnForMaskedLM

        def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
            # The mixin makes labels only for the task tables it knows: not the pre-training table (where
            # SelfAttnForPreTraining is) and not for SelfAttnForReplacedTokenDetection (in no table). BERT's and
            # ELECTRA's test classes add the labels of their pre-training heads the same way.
            inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
            if return_labels:
                batch, length = self.model_tester.batch_size, self.model_tester.seq_length
                if model_class is SelfAttnForPreTraining:
                    inputs["labels"] = torch.zeros((batch, length), dtype=torch.long)
                    inputs["next_sentence_label"] = torch.zeros(batch, dtype=torch.long)
                elif model_class is SelfAttnForReplacedTokenDetection:
                    inputs["labels"] = torch.zeros((batch, length), dtype=torch.long)
            return inputs

    class SelfAttnEncoderDecoderModelTest(*common_bases, hf.GenerationTesterMixin, *training_mixin, unittest.TestCase):
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

    class SelfAttnDecoderModelTest(*common_bases, hf.GenerationTesterMixin, *training_mixin, unittest.TestCase):
        all_model_classes = (SelfAttnModel, SelfAttnForCausalLM)

        def setUp(self):
            self.model_tester = SelfAttnDecoderModelTester(self, hf)
            self.model_tester.causal_lm_class = SelfAttnForCausalLM  # what TrainingTesterMixin trains
            self.config_tester = hf.ConfigTester(self, config_class=SelfAttnConfig, **config_tester_kwargs("decoder"))
