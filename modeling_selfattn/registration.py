"""What importing the selfattn package tells transformers and its neighbours (package-only; saved models carry none
of it): the config and every head for the Auto classes and transformers' static name tables (which pipelines and
Trainer consult), every head for remote-code saving, PEFT's default target modules, the pipelines transformers 5
removed, and the checkpoint conversion that lets from_pretrained read BERT-family folders directly."""

import transformers
from transformers import AutoConfig
from transformers.models.auto import modeling_auto

from . import checkpoints, model
from .config import SelfAttnConfig
from .heads import HEADS
from .pipelines import register_pipelines

MODEL_TYPE = SelfAttnConfig.model_type

# LoRA adapters go on the query and value projections, the usual default for BERT- and BART-like models.
PEFT_TARGET_MODULES = ["q_proj", "v_proj"]


def register() -> None:
    """Idempotent: safe to call again (e.g. after importlib.reload)."""
    AutoConfig.register(MODEL_TYPE, SelfAttnConfig, exist_ok=True)
    SelfAttnConfig.register_for_auto_class()
    for head in HEADS:
        model_class = getattr(model, head.class_name)
        # Every head ships its code with save_pretrained, and names itself in its saved config's auto_map.
        model_class.register_for_auto_class(head.auto_class)
        if head.mapping_names is not None:
            getattr(transformers, head.auto_class).register(SelfAttnConfig, model_class, exist_ok=True)
            getattr(modeling_auto, head.mapping_names)[MODEL_TYPE] = head.class_name
    SelfAttnConfig.foreign_config_translator = staticmethod(checkpoints.selfattn_config_dict)
    model.SelfAttnPreTrainedModel.foreign_checkpoint_loader = staticmethod(checkpoints.foreign_checkpoint_kwargs)
    register_with_peft()
    register_pipelines()


def register_with_peft() -> None:
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
