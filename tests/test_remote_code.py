"""save_pretrained writes a folder that loads as remote code (trust_remote_code=True) where the selfattn package
cannot be imported, and gives the same outputs for every head."""

import json

import pytest
import torch

from integration_helpers import (
    assert_same_outputs,
    causal_config,
    encoder_config,
    encoder_inputs,
    load_without_package,
    model_outputs,
    seq2seq_config,
    seq2seq_inputs,
)
from modeling_selfattn import (
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
)
from modeling_selfattn.heads import AUTO_MAP, HEADS as REGISTRY

CODE_FILES = (
    "config.py", "model.py", "input_checks.py", "kernels.py", "dropout.py", "quantization.py", "scratch.py",
    "lean_generation.py", "packing.py", "hub.py", "heads.py", "argument_values.py",
)


# name -> (class, Auto class, config factory, inputs factory, check generate too)
HEADS = {
    "model": (SelfAttnModel, "AutoModel", encoder_config, encoder_inputs, False),
    "masked_lm": (SelfAttnForMaskedLM, "AutoModelForMaskedLM", encoder_config, encoder_inputs, False),
    "sequence_classification": (
        SelfAttnForSequenceClassification, "AutoModelForSequenceClassification", encoder_config, encoder_inputs, False
    ),
    "token_classification": (
        SelfAttnForTokenClassification, "AutoModelForTokenClassification", encoder_config, encoder_inputs, False
    ),
    "question_answering": (
        SelfAttnForQuestionAnswering, "AutoModelForQuestionAnswering", encoder_config, encoder_inputs, False
    ),
    "multiple_choice": (
        SelfAttnForMultipleChoice,
        "AutoModelForMultipleChoice",
        encoder_config,
        lambda: {"input_ids": torch.randint(3, 99, (2, 3, 6))},
        False,
    ),
    "seq2seq_model": (SelfAttnModel, "AutoModel", seq2seq_config, seq2seq_inputs, False),
    "seq2seq_lm": (SelfAttnForConditionalGeneration, "AutoModelForSeq2SeqLM", seq2seq_config, seq2seq_inputs, True),
    "causal_lm": (SelfAttnForCausalLM, "AutoModelForCausalLM", causal_config, encoder_inputs, True),
    "pretraining": (SelfAttnForPreTraining, "AutoModelForPreTraining", encoder_config, encoder_inputs, False),
    # ELECTRA's discriminator: its saved auto_map points AutoModelForPreTraining at it, as ElectraForPreTraining is.
    "replaced_token_detection": (
        SelfAttnForReplacedTokenDetection, "AutoModelForPreTraining", encoder_config, encoder_inputs, False
    ),
}


def test_every_registered_head_is_covered():
    # A head added to the registry without a case here would ship untested.
    covered = {(model_class.__name__, auto_class) for model_class, auto_class, *_ in HEADS.values()}
    assert {(head.class_name, head.auto_class) for head in REGISTRY} <= covered


@pytest.fixture(scope="module")
def saved_heads(tmp_path_factory):
    """Every head saved to its own folder, with its in-process outputs."""
    root = tmp_path_factory.mktemp("remote_code")
    torch.manual_seed(0)
    saved = {}
    for name, (model_class, auto_class, make_config, make_inputs, generate) in HEADS.items():
        model = model_class(make_config())
        folder = root / name
        model.save_pretrained(folder)
        inputs = make_inputs()
        saved[name] = {
            "auto_class": auto_class,
            "class_name": model_class.__name__,
            "folder": folder,
            "inputs": inputs,
            "generate": generate,
            "expected": model_outputs(model, inputs, generate),
        }
    return root, saved


def test_saved_folder_has_code_and_auto_map_for_every_head(saved_heads):
    _, saved = saved_heads
    for name, case in saved.items():
        files = {path.name for path in case["folder"].iterdir()}
        assert set(CODE_FILES) <= files, f"{name}: code files missing from {sorted(files)}"
        assert "model.safetensors" in files, f"{name}: no safetensors weights in {sorted(files)}"
        auto_map = json.loads((case["folder"] / "config.json").read_text())["auto_map"]
        own_entry = {case["auto_class"]: f"model.{case['class_name']}"}
        assert auto_map == {**AUTO_MAP, **own_entry}, f"{name}: auto_map {auto_map}"
        for target in auto_map.values():
            module, class_name = target.split(".")
            assert f"class {class_name}(" in (case["folder"] / f"{module}.py").read_text(), target


def test_code_files_import_each_other_relatively_only(saved_heads):
    # An absolute `import modeling_selfattn...` would work here but fail for a Hub user without the package.
    _, saved = saved_heads
    folder = saved["model"]["folder"]
    code_files = sorted(folder.glob("*.py"))
    local_modules = tuple(path.stem for path in code_files) + ("modeling_selfattn",)
    for path in code_files:
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in local_modules, f"{path.name}: absolute import: {line.strip()}"


def test_every_head_loads_as_remote_code_with_identical_outputs(saved_heads):
    root, saved = saved_heads
    loaded = load_without_package(saved, root)
    for name, case in saved.items():
        result = loaded[name]
        assert result["module"].startswith("transformers_modules."), f"{name} loaded from {result['module']}"
        assert result["training"] is False, f"{name}: from_pretrained should return the model in eval mode"
        assert_same_outputs(case["expected"], result["outputs"], name)
