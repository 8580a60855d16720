"""Model testers for transformers' ModelTesterMixin: what a tiny selfattn model of each shape is built from and
fed, and the attributes the mixin reads (batch_size, seq_length, num_hidden_layers, hidden_size, ...).

One tester per config shape (tests/conftest.py's make_tiny_config): "encoder" (decoder_layers=0, every encoder
head), "encoder_decoder" (the bare model and SelfAttnForConditionalGeneration) and "decoder" (encoder_layers=0:
the bare model and SelfAttnForCausalLM).
"""

from __future__ import annotations

import warnings

import torch
from conftest import BOS_TOKEN_ID, DECODER_START_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, make_tiny_config


# The tiny config's position table (tests/conftest.py) covers 16 tokens; transformers' GenerationTesterMixin feeds
# longer sequences: test_generate_with_static_cache makes seq_length + 20 tokens, test_left_padding_compatibility
# puts 32 padding tokens before the seq_length real ones. A table of 64 rows fits both.
MAX_POSITIONS = 64


class SelfAttnModelTester:
    shape = "encoder"

    def __init__(
        self,
        parent,
        common,
        batch_size: int = 3,
        seq_length: int = 7,
        num_labels: int = 3,
        num_choices: int = 2,
        is_training: bool = True,
    ):
        self.parent = parent
        self.common = common  # the sdist's test_modeling_common names (ids_tensor, random_attention_mask)
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.num_labels = num_labels
        self.num_choices = num_choices
        self.is_training = is_training
        config = self.get_config()
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.num_hidden_layers = config.num_hidden_layers
        self.type_vocab_size = config.type_vocab_size
        self.pad_token_id = PAD_TOKEN_ID
        if self.shape == "encoder_decoder":
            # The mixin reads these for the two sides. They are equal because _prepare_for_class makes seq2seq
            # labels of length seq_length, which must match the decoder inputs.
            self.encoder_seq_length = self.decoder_seq_length = seq_length

    def get_config(self):
        return make_tiny_config(self.shape, num_labels=self.num_labels, max_position_embeddings=MAX_POSITIONS)

    def token_ids(self, length: int) -> torch.Tensor:
        # ids >= 3 so that pad / bos / eos appear only where the tester puts them
        return self.common.ids_tensor([self.batch_size, length], self.vocab_size - 3) + 3

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = self.token_ids(self.seq_length)
        inputs = {"input_ids": input_ids, "attention_mask": self.common.random_attention_mask(input_ids.shape)}
        if self.shape == "encoder":
            inputs["token_type_ids"] = self.common.ids_tensor(input_ids.shape, self.type_vocab_size)
        elif self.shape == "encoder_decoder":
            input_ids[:, -1] = EOS_TOKEN_ID
            decoder_input_ids = self.token_ids(self.decoder_seq_length)
            decoder_input_ids[:, 0] = DECODER_START_TOKEN_ID
            inputs["decoder_input_ids"] = decoder_input_ids
            inputs["decoder_attention_mask"] = self.common.random_attention_mask(decoder_input_ids.shape)
        else:
            input_ids[:, 0] = BOS_TOKEN_ID
        return config, inputs


class SelfAttnEncoderModelTester(SelfAttnModelTester):
    shape = "encoder"


class SelfAttnEncoderDecoderModelTester(SelfAttnModelTester):
    shape = "encoder_decoder"


class SelfAttnDecoderModelTester(SelfAttnModelTester):
    shape = "decoder"


def config_tester_kwargs(shape: str) -> dict:
    """Fields for transformers' ConfigTester: a tiny config of `shape`, all given explicitly (it checks that each
    survives to_json_string)."""
    config = make_tiny_config(shape)
    names = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "encoder_layers", "decoder_layers")
    return {name: getattr(config, name) for name in names}


class SelfAttnCommonTestSettings:
    """What all three test classes set on top of transformers' ModelTesterMixin (first in their bases)."""

    # ModelTesterMixin skips test_can_init_all_missing_weights ("Not a prioritized model for now") for models whose
    # configuration file carries no "# Copyright <year >= 2023>" line, which ours has none of. The check (every
    # weight is set by _init_weights) applies to any model: run it.
    test_can_init_all_missing_weights_before_2023 = True

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_bc_cache_name_forward(self):
        # The test checks that `past_key_values=` gives a FutureWarning (as transformers' deprecate_kwarg raises) by
        # recording warnings inside the test, but pyproject.toml's filterwarnings ignores every FutureWarning, which
        # would hide it from the recorder: let FutureWarnings through for this test.
        with warnings.catch_warnings():
            warnings.simplefilter("always", FutureWarning)
            super().test_bc_cache_name_forward()


class SelfAttnTrainingSettings:
    """Settings for transformers' TrainingTesterMixin.test_training_overfit (first in the bases, before it)."""

    # The mixin's default batch is 64 tokens long; 16 keep the test short and the model still overfits past the
    # mixin's thresholds (below).
    training_overfit_seq_length = 16
    # The mixin's 300 steps at lr 1e-3 take ~30-40 s per model on 2 shared cores; 100 steps at 3e-3 reach the same
    # thresholds (loss and gradient norm down by > 90%; measured ~99% and ~97%) in a third of the time.
    training_overfit_steps = 100
    training_overfit_learning_rate = 3e-3
