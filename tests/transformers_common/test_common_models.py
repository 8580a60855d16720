"""transformers' ModelTesterMixin (and TrainingTesterMixin, GenerationTesterMixin's stand-in for the generating
classes) on every selfattn class, one test class per model shape: encoder-only, encoder-decoder, decoder-only."""

import importlib
import unittest
from unittest import mock

import torch
from conftest import DECODER_START_TOKEN_ID, EOS_TOKEN_ID

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

from .sdist import PACKAGE, CommonTestsUnavailable, load_common_tests, unavailable_test
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
    from parameterized import parameterized  # load_common_tests() made sure it is there

    # The test behind ModelTesterMixin.test_eager_matches_sdpa_inference, which its module keeps for overrides.
    modeling_common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    eager_matches_sdpa_inference = modeling_common._test_eager_matches_sdpa_inference

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

        @parameterized.expand(modeling_common.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
        def test_eager_matches_sdpa_inference(
            self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
        ):
            # The mixin's test pads one row on the left for every class. The heads whose output is read from the first
            # position refuse that (first_position_output: it would be padding, the same for every such row); the
            # test runs on the other classes, and those heads must raise the refusal on the same batch.
            arguments = (name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels)
            if padding_side != "left" or not use_attention_mask:
                eager_matches_sdpa_inference(self, *arguments)
                return
            refusing = [cls for cls in self.all_model_classes if getattr(cls, "first_position_output", None)]
            taking = tuple(cls for cls in self.all_model_classes if cls not in refusing)
            with mock.patch.object(self, "all_model_classes", taking):
                eager_matches_sdpa_inference(self, *arguments)
            for model_class in refusing:
                with mock.patch.object(self, "all_model_classes", (model_class,)):
                    with self.assertRaisesRegex(ValueError, r"^attention_mask: .* padded on the left"):
                        eager_matches_sdpa_inference(self, *arguments)

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

        def test_custom_4d_attention_mask(self):
            """GenerationTesterMixin's test (a custom 4-D mask gives the logits of the padded 2-D batch it stands for)
            calls the model as a decoder-only one, without decoder inputs; here for the encoder-decoder, on the decoder
            side. Three continuations of one target prefix, of unequal lengths, packed into one decoder row with their
            own decoder_position_ids and a 4-D mask that lets each token see the prefix and its own continuation,
            causally, give the logits the same three targets give as a right-padded batch over the same source. The
            mask in transformers' additive form (0 or the dtype's minimum) and as booleans, with eager and SDPA."""
            config = self.model_tester.get_config()
            generator = torch.Generator().manual_seed(0)

            def ids(length: int) -> list[int]:
                return torch.randint(3, config.vocab_size, (length,), generator=generator).tolist()

            prefix = [DECODER_START_TOKEN_ID, *ids(2)]
            continuations = [ids(1), ids(2), ids(1)]
            packed = prefix + [token for continuation in continuations for token in continuation]
            # the continuation each packed token belongs to (-1: the prefix), and its position in its own target
            owner = [-1] * len(prefix) + [index for index, c in enumerate(continuations) for _ in c]
            positions = list(range(len(prefix))) + [len(prefix) + step for c in continuations for step in range(len(c))]
            visible = torch.tensor(
                [[j <= i and owner[j] in (-1, owner[i]) for j in range(len(packed))] for i in range(len(packed))]
            )
            longest = len(prefix) + max(len(c) for c in continuations)
            targets = torch.full((len(continuations), longest), config.pad_token_id)
            target_mask = torch.zeros_like(targets)
            for row, continuation in enumerate(continuations):
                target = prefix + continuation
                targets[row, : len(target)] = torch.tensor(target)
                target_mask[row, : len(target)] = 1
            source = torch.tensor([ids(6) + [EOS_TOKEN_ID, config.pad_token_id]])
            source_mask = (source != config.pad_token_id).long()
            count = len(continuations)
            batch_source = dict(input_ids=source.expand(count, -1), attention_mask=source_mask.expand(count, -1))
            masks = {
                "additive": torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None],
                "boolean": visible[None, None],
            }
            for model_class in self.all_generative_model_classes:
                model = model_class(config).eval()
                for implementation in ("eager", "sdpa"):
                    model.set_attn_implementation(implementation)
                    with torch.no_grad():
                        expected = model(**batch_source, decoder_input_ids=targets, decoder_attention_mask=target_mask)
                        for kind, mask in masks.items():
                            logits = model(
                                input_ids=source,
                                attention_mask=source_mask,
                                decoder_input_ids=torch.tensor([packed]),
                                decoder_attention_mask=mask,
                                decoder_position_ids=torch.tensor([positions]),
                            ).logits[0]
                            for index, (row, position) in enumerate(zip(owner, positions)):
                                rows = range(count) if row == -1 else [row]
                                for compared in rows:
                                    torch.testing.assert_close(
                                        logits[index],
                                        expected.logits[compared, position],
                                        rtol=0,
                                        atol=1e-5,
                                        msg=f"{model_class.__name__}, {implementation}, {kind} mask, token {index}",
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

        if hasattr(hf.GenerationTesterMixin, "test_left_padding_compatibility"):  # not in the sdist's stand-in

            def test_left_padding_compatibility(self):
                # The mixin skips "decoder-only models derived from encoder-decoder models" by a heuristic: a config
                # key that starts with "encoder". One config class serves all three selfattn shapes, so a
                # decoder-only config carries encoder_layers=0, which says there is no encoder; the model supports
                # left padding. The mixin's check then runs as written, with that one key out of its sight.
                to_dict = SelfAttnConfig.to_dict

                def without_absent_encoder(config):
                    fields = to_dict(config)
                    if fields.get("encoder_layers") == 0:
                        del fields["encoder_layers"]
                    return fields

                with mock.patch.object(SelfAttnConfig, "to_dict", without_absent_encoder):
                    super().test_left_padding_compatibility()
