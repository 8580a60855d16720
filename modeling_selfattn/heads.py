"""The selfattn classes users load, listed once. Every other list is derived from this one: the `auto_map` written
into each config.json, the registration with transformers' Auto classes and their static name tables, the model
card's pipeline tag and intended use, and the package's exports.

Shipped with saved models (the configuration imports it), so it imports nothing.
"""

from typing import NamedTuple


class Head(NamedTuple):
    class_name: str
    # The transformers Auto class that loads it.
    auto_class: str
    # transformers' static name table for that task (`transformers.models.auto.modeling_auto.<name>`), which pipelines
    # and Trainer consult. None: the Auto class's slot belongs to another head, so the package does not register this
    # one; a saved model of it still names it in its own config's auto_map.
    mapping_names: str | None
    # The Hub's pipeline tag for the model card (the Hub has none for multiple choice or replaced-token detection).
    pipeline_tag: str | None
    # The model card's "Intended use"; {labels} is filled from config.id2label.
    intended_use: str


HEADS = (
    Head(
        "SelfAttnModel",
        "AutoModel",
        "MODEL_MAPPING_NAMES",
        "feature-extraction",
        "Contextual token representations, to pool into sentence embeddings or to feed a task head.",
    ),
    Head(
        "SelfAttnForMaskedLM",
        "AutoModelForMaskedLM",
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
        "fill-mask",
        "Predicting masked tokens; the usual starting point for fine-tuning an encoder on a downstream task.",
    ),
    Head(
        "SelfAttnForSequenceClassification",
        "AutoModelForSequenceClassification",
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "text-classification",
        "Classifying a text or a text pair into the labels {labels}.",
    ),
    Head(
        "SelfAttnForTokenClassification",
        "AutoModelForTokenClassification",
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
        "token-classification",
        "Labelling each token (named entities, parts of speech) with the labels {labels}.",
    ),
    Head(
        "SelfAttnForQuestionAnswering",
        "AutoModelForQuestionAnswering",
        "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
        "question-answering",
        "Extractive question answering: finding the answer span in a context passage.",
    ),
    Head(
        "SelfAttnForMultipleChoice",
        "AutoModelForMultipleChoice",
        "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
        None,
        "Choosing the best of several candidate continuations or answers.",
    ),
    Head(
        "SelfAttnForConditionalGeneration",
        "AutoModelForSeq2SeqLM",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "text2text-generation",
        "Sequence-to-sequence generation such as translation or summarisation, with `model.generate`.",
    ),
    Head(
        "SelfAttnForCausalLM",
        "AutoModelForCausalLM",
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "text-generation",
        "Left-to-right text generation with `model.generate`.",
    ),
    Head(
        "SelfAttnForPreTraining",
        "AutoModelForPreTraining",
        "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
        None,
        "BERT-style pre-training (masked-LM and next-sentence prediction); the starting point for further "
        "pre-training or fine-tuning an encoder.",
    ),
    # ELECTRA's discriminator: transformers loads it (ElectraForPreTraining) with AutoModelForPreTraining too.
    Head(
        "SelfAttnForReplacedTokenDetection",
        "AutoModelForPreTraining",
        None,
        None,
        "Replaced-token detection (ELECTRA's discriminator): scoring each token as original or replaced; the "
        "starting point for fine-tuning an ELECTRA-style encoder.",
    ),
)

HEADS_BY_CLASS = {head.class_name: head for head in HEADS}

# Written into every saved config.json so that each head loads as remote code (trust_remote_code=True) where the
# package is not installed; save_pretrained itself records only the class being saved.
AUTO_MAP = {
    "AutoConfig": "config.SelfAttnConfig",
    **{head.auto_class: f"model.{head.class_name}" for head in HEADS if head.mapping_names is not None},
}
