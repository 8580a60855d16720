"""Helpers shared by the generation and seq2seq tests."""

from conftest import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, TINY_VOCAB_SIZE
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

FIRST_WORD_ID = 3  # after <pad>, <s>, </s>


def word_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: the special tokens, then made-up words "w3", "w4", ... up to
    `vocab_size` ids ("w3" doubles as the unknown token)."""
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID}
    vocab.update({f"w{index}": index for index in range(FIRST_WORD_ID, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=f"w{FIRST_WORD_ID}"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token=f"w{FIRST_WORD_ID}",
        padding_side=padding_side,
    )
