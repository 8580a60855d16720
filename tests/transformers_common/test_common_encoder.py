"""transformers' ModelTesterMixin (and TrainingTesterMixin) on every encoder-only selfattn class."""

import unittest

import torch

from modeling_selfattn import (
    SelfAttnConfig,
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

    class SelfAttnEncoderModelTest(
        SelfAttnCommonTestSettings,
        SelfAttnTrainingSettings,
        hf.ModelTesterMixin,
        *training_mixin,
        unittest.TestCase,
    ):
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
