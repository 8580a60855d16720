"""selfattn: the multi-head self-attention Transformer as a transformers model family.

Importing this package registers `model_type="selfattn"` with transformers' Auto classes (and their
static name tables, which pipelines and Trainer consult), marks every class for remote-code saving, and
tells PEFT which modules its adapters target by default.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto import modeling_auto

from .configuration_selfattn import SelfAttnConfig
from .pipelines import register_pipelines
from .modeling_selfattn import (
    SelfAttnForCausalLM,
    SelfAttnForConditionalGeneration,
    SelfAttnForMaskedLM,
    SelfAttnForMultipleChoice,
    SelfAttnForPreTraining,
    SelfAttnForQuestionAnswering,
    SelfAttnForReplacedTokenDetection,
    SelfAttnForSequenceClassification,
    SelfAttnForTokenClassification,
    SelfAttnModel,
    SelfAttnPreTrainedModel,
)

MODEL_TYPE = SelfAttnConfig.model_type

# Auto class -> (our class, transformers' static name table for that task)
HEADS = {
    AutoModel: (SelfAttnModel, "MODEL_MAPPING_NAMES"),
    AutoModelForMaskedLM: (SelfAttnForMaskedLM, "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    AutoModelForSequenceClassification: (SelfAttnForSequenceClassification, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    AutoModelForTokenClassification: (SelfAttnForTokenClassification, "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    AutoModelForQuestionAnswering: (SelfAttnForQuestionAnswering, "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    AutoModelForMultipleChoice: (SelfAttnForMultipleChoice, "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    AutoModelForSeq2SeqLM: (SelfAttnForConditionalGeneration, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    AutoModelForCausalLM: (SelfAttnForCausalLM, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    AutoModelForPreTraining: (SelfAttnForPreTraining, "MODEL_FOR_PRETRAINING_MAPPING_NAMES"),
}

# LoRA adapters go on the query and value projections, the usual default for BERT- and BART-like models.
PEFT_TARGET_MODULES = ["q_proj", "v_proj"]


def register() -> None:
    """Idempotent: safe to call again (e.g. after importlib.reload)."""
    AutoConfig.register(MODEL_TYPE, SelfAttnConfig, exist_ok=True)
    SelfAttnConfig.register_for_auto_class()
    for auto_class, (model_class, names_table) in HEADS.items():
        auto_class.register(SelfAttnConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
        getattr(modeling_auto, names_table)[MODEL_TYPE] = model_class.__name__
    _register_with_peft()


def _register_with_peft() -> None:
    try:
        from peft.utils import constants
    except ImportError:  # PEFT is optional
        return
    for name in dir(constants):
        table = getattr(constants, name)
        if name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_TARGET_MODULES_MAPPING"):
            if isinstance(table, dict) and "bart" in table and table["bart"] == ["q_proj", "v_proj"]:
                table.setdefault(MODEL_TYPE, list(PEFT_TARGET_MODULES))
    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(MODEL_TYPE, list(PEFT_TARGET_MODULES))
    constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.setdefault(MODEL_TYPE, ["k_proj", "v_proj", "fc2"])
    constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.setdefault(MODEL_TYPE, ["fc2"])
    constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING.setdefault(
        MODEL_TYPE, ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
    )


register()
register_pipelines()

__all__ = [
    "SelfAttnConfig",
    "SelfAttnPreTrainedModel",
    "SelfAttnModel",
    "SelfAttnForMaskedLM",
    "SelfAttnForSequenceClassification",
    "SelfAttnForTokenClassification",
    "SelfAttnForQuestionAnswering",
    "SelfAttnForMultipleChoice",
    "SelfAttnForConditionalGeneration",
    "SelfAttnForCausalLM",
    "SelfAttnForPreTraining",
    "SelfAttnForReplacedTokenDetection",
    "register",
]
