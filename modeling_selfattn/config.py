"""Configuration of the selfattn family: one config describes the encoder-only (BERT-style), the
encoder-decoder ("Attention Is All You Need") and the decoder-only shapes of the multi-head
self-attention Transformer."""

import dataclasses
import json

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from .heads import AUTO_MAP
from .hub import refuse_to_overwrite_foreign_code

POSITION_EMBEDDING_TYPES = ("learned", "sinusoidal")
# The values of PreTrainedConfig.problem_type, which transformers' classification losses read.
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@strict
class SelfAttnConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: number of token ids.
        hidden_size: width of every layer (d_model in the paper).
        num_attention_heads: heads per attention module; `hidden_size` must be a multiple of it and the
            scores are scaled by 1/sqrt(hidden_size / num_attention_heads).
        encoder_layers / decoder_layers: depth of each stack. `decoder_layers=0` is an encoder-only model
            (BERT-style); `encoder_layers=0` is a decoder-only causal LM; both > 0 is the encoder-decoder.
        intermediate_size: inner width of the feed-forward block.
        hidden_act: activation of the feed-forward block, any key of `transformers.activations.ACT2FN`.
        hidden_dropout_prob / attention_dropout / activation_dropout / classifier_dropout: dropout after each
            sub-layer, on the attention probabilities, after the FFN activation, and before task heads
            (`None` = `hidden_dropout_prob`).
        max_position_embeddings: longest sequence the position table covers.
        position_embedding_type: `"learned"` (BERT) or `"sinusoidal"` (the paper; fixed, not trained).
        position_offset: rows reserved before the first position (2 for BART and RoBERTa checkpoints).
        padding_aware_positions: count positions over non-padding tokens only and give padding the row
            `position_offset - 1` (RoBERTa's scheme); otherwise positions are 0, 1, 2, ... for every token.
        type_vocab_size: number of token types (segments); 0 removes the token-type embedding.
        embedding_size: width of the token embeddings if smaller than `hidden_size` (ELECTRA); a linear
            projection then maps them to `hidden_size`. `None` means `hidden_size`.
        embedding_layer_norm: LayerNorm over the summed embeddings (BERT, BART; not the paper or Marian).
        scale_embedding: multiply token embeddings by sqrt(hidden_size), as the paper does.
        pre_layer_norm: pre-LN blocks (x + f(LN(x)), with a final LayerNorm per stack) instead of the
            paper's and BERT's post-LN blocks (LN(x + f(x))).
        layer_norm_eps: epsilon of every LayerNorm.
        add_pooling_layer: encoder-only models get a pooler (dense + `pooler_activation` on the first token)
            used by the sequence-classification and multiple-choice heads.
        pooler_activation: activation of the pooler, any key of ACT2FN (`tanh` for BERT).
        add_final_logits_bias: a fixed bias added to the LM logits of generating heads (Marian, BART).
        lm_head_transform: generating heads use BERT's MLM head (dense + activation + LayerNorm, then the tied
            projection with a trained bias) instead of projecting the decoder output onto the token table
            directly; BERT2BERT warm starts set it, so that the decoder's outputs keep BERT's output layer.
        tie_word_embeddings: tie LM output weights to the input embeddings.
        initializer_range: std of the normal initialisation.
        pruned_heads: attention heads removed by `model.prune_heads`, as {attention: sorted head indices}, the
            indices counted among the `num_attention_heads` heads the module had before any pruning. An
            attention is named "encoder.L" (self-attention of encoder layer L), "decoder.L" (self-attention of
            decoder layer L) or "decoder.L.cross_attn" (cross-attention of decoder layer L). The model builds
            each attention with the heads left, so a pruned model reloads from its config.
        source_model_type: the `model_type` of the checkpoint the conversion read (`bert`, `xlm-roberta`, `marian`,
            ...), which `selfattn-convert export` writes back by default: shapes alone do not tell every family
            apart (XLM-R's is RoBERTa's). `None` for a model not converted.
        source_config: the fields of that checkpoint's config.json that no selfattn field holds (DistilBERT's
            `qa_dropout`, ELECTRA's `summary_type` for a head without the summary, a field a user added), as
            {field name: JSON value}, so that exporting back to the `source_model_type` family writes them as they
            were; export to another family leaves them out, and selfattn's own fields win over any of them. The
            conversion leaves out transformers' bookkeeping (`transformers_version`, `_name_or_path`, `model_type`,
            `architectures`, `dtype`, which the tensors decide), decoding settings (kept in the generation config of
            a generating model) and fields that name files of the source folder (`auto_map`,
            `transformers_weights`). No selfattn code reads them. `None` for a model not converted, or where the
            source has no such field.
    """

    model_type = "selfattn"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Tensor parallelism (from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))), named from the
    # bare model: each attention splits its heads across devices (q/k/v by output columns, o by input rows, one
    # all-reduce after o_proj), each FFN its inner width (fc1 by columns, fc2 by rows). Embeddings, LayerNorms and
    # task heads stay whole on every device. The plan needs num_attention_heads divisible by the number of devices.
    base_model_tp_plan = {
        "encoder.layers.*.self_attn.q_proj": "colwise",
        "encoder.layers.*.self_attn.k_proj": "colwise",
        "encoder.layers.*.self_attn.v_proj": "colwise",
        "encoder.layers.*.self_attn.o_proj": "rowwise",
        "encoder.layers.*.ffn.fc1": "colwise",
        "encoder.layers.*.ffn.fc2": "rowwise",
        "decoder.layers.*.self_attn.q_proj": "colwise",
        "decoder.layers.*.self_attn.k_proj": "colwise",
        "decoder.layers.*.self_attn.v_proj": "colwise",
        "decoder.layers.*.self_attn.o_proj": "rowwise",
        "decoder.layers.*.cross_attn.q_proj": "colwise",
        "decoder.layers.*.cross_attn.k_proj": "colwise",
        "decoder.layers.*.cross_attn.v_proj": "colwise",
        "decoder.layers.*.cross_attn.o_proj": "rowwise",
        "decoder.layers.*.ffn.fc1": "colwise",
        "decoder.layers.*.ffn.fc2": "rowwise",
    }

    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    encoder_layers: int = 12
    decoder_layers: int = 0
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_dropout: float | int = 0.1
    activation_dropout: float | int = 0.0
    classifier_dropout: float | int | None = None
    max_position_embeddings: int = 512
    position_embedding_type: str = "learned"
    position_offset: int = 0
    padding_aware_positions: bool = False
    type_vocab_size: int = 2
    embedding_size: int | None = None
    embedding_layer_norm: bool = True
    scale_embedding: bool = False
    pre_layer_norm: bool = False
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True
    pooler_activation: str = "tanh"
    add_final_logits_bias: bool = False
    lm_head_transform: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pruned_heads: dict[str, list[int]] | None = None
    source_model_type: str | None = None
    source_config: dict | None = None

    def __post_init__(self, **kwargs):
        # A config.json of another family would otherwise build a BERT-base-sized default that only carries the
        # foreign model_type: refuse it. (With the package, get_config_dict translates BERT-family configs first.)
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise ValueError(
                f"This config has model_type={model_type!r}; SelfAttnConfig reads selfattn configs only. With the "
                "selfattn package installed, from_pretrained reads BERT, RoBERTa, XLM-RoBERTa, DistilBERT and ELECTRA "
                "folders directly (it translates them); otherwise, or for another family, convert the checkpoint "
                "first (selfattn-convert bert|seq2seq SOURCE OUTPUT)."
            )
        # `num_hidden_layers` is the name transformers' tooling reads; it sets the depth of the main stack.
        num_hidden_layers = kwargs.pop("num_hidden_layers", None)
        if num_hidden_layers is not None:
            self.num_hidden_layers = num_hidden_layers
        super().__post_init__(**kwargs)
        # A saved config's own entries stay (an ELECTRA discriminator names itself under AutoModelForPreTraining), and
        # so do other Auto classes' (a tokenizer's); entries naming files an older release wrote under other names
        # give way to ours.
        our_modules = {target.split(".")[0] for target in AUTO_MAP.values()}
        saved = getattr(self, "auto_map", None) or {}
        kept = {
            key: target for key, target in saved.items() if key not in AUTO_MAP or target.split(".")[0] in our_modules
        }
        self.auto_map = {**AUTO_MAP, **kept}
        # Derived from the two depths; transformers reads it to tell seq2seq models apart.
        is_encoder_decoder = self.encoder_layers > 0 and self.decoder_layers > 0
        if self.is_encoder_decoder and not is_encoder_decoder:
            raise ValueError(
                f"SelfAttnConfig(is_encoder_decoder=True) with encoder_layers={self.encoder_layers} and decoder_layers="
                f"{self.decoder_layers}: the shape follows the two depths. For an encoder-decoder set both > 0 "
                "(SelfAttnForConditionalGeneration), or leave is_encoder_decoder out."
            )
        self.is_encoder_decoder = is_encoder_decoder
        # transformers 5 keeps the two label maps apart, and pipelines read both: derive the missing one.
        if self.id2label is not None and self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}
        self.check()

    # Set by the selfattn package when imported (its checkpoint conversion, which saved models do not ship): a
    # function from a BERT-family config dict to a selfattn one, refusing any other family.
    foreign_config_translator = None

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        refuse_to_overwrite_foreign_code(self, save_directory, self.model_type)
        super().save_pretrained(save_directory, push_to_hub, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # transformers sets overrides of fields (from_pretrained(path, hidden_size=...)) on the config once built,
        # past __post_init__'s checks and derived fields: build it with them instead. dtype stays with transformers,
        # which reads "auto" itself.
        fields = {field.name for field in dataclasses.fields(cls)} - {"dtype"} | {"num_hidden_layers"}
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in fields}
        if overrides.keys() & {"encoder_layers", "decoder_layers", "num_hidden_layers"}:
            # The saved is_encoder_decoder was derived from the saved depths.
            config_dict = {key: value for key, value in config_dict.items() if key != "is_encoder_decoder"}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """With the selfattn package installed, also reads the config.json of a BERT-family checkpoint (bert,
        roberta, xlm-roberta, distilbert, electra), translated to selfattn fields."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        # Without the translator a foreign config reaches __post_init__, which refuses it.
        if config_dict.get("model_type", cls.model_type) != cls.model_type and cls.foreign_config_translator:
            config_dict = cls.foreign_config_translator(config_dict)
        return config_dict, kwargs

    @property
    def num_hidden_layers(self) -> int:
        """Depth of the main stack: the encoder's, or the decoder's in a decoder-only model."""
        return self.encoder_layers if self.encoder_layers > 0 else self.decoder_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int):
        if self.encoder_layers > 0 or self.decoder_layers == 0:
            self.encoder_layers = value
        else:
            self.decoder_layers = value

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def attention_keys(self) -> list[str]:
        """The names `pruned_heads` and `prune_heads` use for this shape's attention modules, bottom to top:
        "encoder.L", then "decoder.L" and (encoder-decoder) "decoder.L.cross_attn"."""
        keys = [attention_key("encoder", layer) for layer in range(self.encoder_layers)]
        for layer in range(self.decoder_layers):
            keys.append(attention_key("decoder", layer))
            if self.encoder_layers > 0:
                keys.append(attention_key("decoder", layer, cross_attention=True))
        return keys

    def kept_heads(self, key: str | None) -> list[int]:
        """Indices (among the original `num_attention_heads`) of the heads the attention `key` still has."""
        pruned = set((self.pruned_heads or {}).get(key, ())) if key is not None else set()
        return [head for head in range(self.num_attention_heads) if head not in pruned]

    def resolve_heads_to_prune(self, heads_to_prune: dict) -> dict[str, list[int]]:
        """`heads_to_prune` of `prune_heads` with every key named as in `pruned_heads`, checked against this config:
        a ValueError (TypeError for wrong types) names any key, layer or head that cannot be pruned."""
        if not isinstance(heads_to_prune, dict):
            raise TypeError(
                f"heads_to_prune must be a dict {{layer: [heads]}}, got {type(heads_to_prune).__name__}; e.g. "
                "{0: [1, 3]} prunes heads 1 and 3 of layer 0."
            )
        keys = self.attention_keys()
        one_stack = "encoder" if self.decoder_layers == 0 else "decoder" if self.encoder_layers == 0 else None
        resolved = {}
        for key, heads in heads_to_prune.items():
            if isinstance(key, int) and not isinstance(key, bool):
                if one_stack is None:
                    raise ValueError(
                        f"heads_to_prune key {key!r}: an encoder-decoder model has several attentions per layer "
                        "index; name one: 'encoder.L', 'decoder.L' (decoder self-attention) or 'decoder.L.cross_attn'."
                    )
                layers = self.encoder_layers if one_stack == "encoder" else self.decoder_layers
                if not 0 <= key < layers:
                    raise ValueError(
                        f"heads_to_prune key {key}: layer out of range, this model's {one_stack} has layers 0.."
                        f"{layers - 1}."
                    )
                name = attention_key(one_stack, key)
            elif isinstance(key, str):
                if key not in keys:
                    raise ValueError(
                        f"heads_to_prune key {key!r} names no attention of this model; use a layer index "
                        f"(int) or one of {keys}."
                    )
                name = key
            else:
                raise TypeError(
                    f"heads_to_prune keys are layer indices (int) or attention names such as 'encoder.0', got "
                    f"{key!r} ({type(key).__name__})."
                )
            if name in resolved:
                raise ValueError(f"heads_to_prune names the attention {name!r} twice ({key!r} and another key).")
            if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
                raise TypeError(f"heads_to_prune[{key!r}] must be a list of head indices, got {heads!r}.")
            heads = list(heads)
            wrong_type = [head for head in heads if not isinstance(head, int) or isinstance(head, bool)]
            if wrong_type:
                raise TypeError(f"heads_to_prune[{key!r}] holds non-integer heads {wrong_type}; give head indices.")
            out_of_range = [head for head in heads if not 0 <= head < self.num_attention_heads]
            if out_of_range:
                raise ValueError(
                    f"heads_to_prune[{key!r}] has heads {out_of_range} out of range: heads are numbered 0.."
                    f"{self.num_attention_heads - 1} (as before any pruning)."
                )
            repeated = sorted({head for head in heads if heads.count(head) > 1})
            if repeated:
                raise ValueError(f"heads_to_prune[{key!r}] lists heads {repeated} more than once.")
            already = sorted(set(heads) - set(self.kept_heads(name)))
            if already:
                raise ValueError(
                    f"heads_to_prune[{key!r}]: heads {already} of {name!r} are already pruned (config.pruned_heads"
                    f"[{name!r}] = {self.pruned_heads[name]}); head indices count the original "
                    f"{self.num_attention_heads} heads, so name only heads still there."
                )
            if heads:
                resolved[name] = sorted(heads)
        return resolved

    def check(self):
        """Raise a ValueError naming the field and the fix for any config no model can be built from.

        Runs on creation; call it again after editing fields by hand (models call it when built)."""
        positive = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"SelfAttnConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("encoder_layers", "decoder_layers", "type_vocab_size", "position_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"SelfAttnConfig.{name} must be >= 0, got {getattr(self, name)}.")
        chunk_size = self.chunk_size_feed_forward
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise ValueError(
                f"SelfAttnConfig.chunk_size_feed_forward must be an integer, got {chunk_size!r}: the positions each "
                "feed-forward takes at a time, or 0 (or less, as BERT reads it) for all at once."
            )
        if self.encoder_layers == 0 and self.decoder_layers == 0:
            raise ValueError(
                "SelfAttnConfig needs at least one stack: set encoder_layers > 0 (encoder-only or encoder-decoder) "
                "or decoder_layers > 0 (decoder-only)."
            )
        # transformers' other families read is_decoder (BertModel turns causal, EncoderDecoderModel sets it on its
        # decoder's config); selfattn's encoder stack would attend both ways whatever it says.
        if getattr(self, "is_decoder", False) and self.decoder_layers == 0:
            raise ValueError(
                "SelfAttnConfig(is_decoder=True) with decoder_layers=0: the encoder-only shape attends both ways and "
                "reads no is_decoder. For a causal (left-to-right) model take the decoder-only shape, encoder_layers=0 "
                "and decoder_layers > 0 (SelfAttnForCausalLM), or leave is_decoder out."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            divisors = [h for h in range(1, min(self.hidden_size, 64) + 1) if self.hidden_size % h == 0]
            raise ValueError(
                f"SelfAttnConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); choose num_attention_heads from {divisors} or change hidden_size."
            )
        for name in ("hidden_act", "pooler_activation"):
            if getattr(self, name) not in ACT2FN:
                raise ValueError(
                    f"SelfAttnConfig.{name}={getattr(self, name)!r} is not a known activation; use one of "
                    f"{sorted(ACT2FN)}."
                )
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"SelfAttnConfig.position_embedding_type={self.position_embedding_type!r} is not supported; use one "
                f"of {POSITION_EMBEDDING_TYPES}."
            )
        # The sinusoidal table is as wide as the token embeddings, which embedding_size may make narrower.
        width_field = "embedding_size" if self.embedding_size is not None else "hidden_size"
        if self.position_embedding_type == "sinusoidal" and getattr(self, width_field) % 2:
            raise ValueError(
                f"SelfAttnConfig: sinusoidal positions need an even {width_field}, got {getattr(self, width_field)}."
            )
        if self.padding_aware_positions and self.position_offset < 1:
            raise ValueError(
                "SelfAttnConfig.padding_aware_positions needs position_offset >= 1 (padding takes row "
                "position_offset - 1); set position_offset=pad_token_id + 1 as RoBERTa does."
            )
        if self.padding_aware_positions and self.pad_token_id is None:
            raise ValueError(
                "SelfAttnConfig.padding_aware_positions counts positions over the tokens that are not padding, which "
                "needs pad_token_id; set pad_token_id (the tokenizer's), or padding_aware_positions=False."
            )
        if self.embedding_size is not None and self.embedding_size <= 0:
            raise ValueError(f"SelfAttnConfig.embedding_size must be positive or None, got {self.embedding_size}.")
        for name in ("hidden_dropout_prob", "attention_dropout", "activation_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"SelfAttnConfig.{name} must be within [0, 1], got {value}.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            # nn.Embedding reads a negative padding index from the end of the table: -1 would zero and freeze the
            # last real token's embedding.
            raise ValueError(
                f"SelfAttnConfig.pad_token_id must be a token id in [0, {self.vocab_size - 1}] or None, got "
                f"{self.pad_token_id}; use the tokenizer's pad_token_id, or None for a model without padding."
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"SelfAttnConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}.")
        if self.initializer_range < 0:
            raise ValueError(
                f"SelfAttnConfig.initializer_range is the standard deviation of the initial weights and must be >= 0, "
                f"got {self.initializer_range}."
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"SelfAttnConfig.problem_type={self.problem_type!r} is unknown to transformers' losses; use one of "
                f"{PROBLEM_TYPES}, or None to infer it from num_labels and the labels' dtype."
            )
        if self.num_labels is not None and self.num_labels < 1:
            # transformers turns num_labels=-1 into an empty id2label, which reads back as 0.
            raise ValueError(
                f"SelfAttnConfig.num_labels must be >= 1, got {self.num_labels} (id2label={self.id2label}; a negative "
                "num_labels leaves it empty): a classifier needs an output per label, 1 for regression."
            )
        # BertModel adds cross-attention to its layers with add_cross_attention=True (EncoderDecoderModel sets it on
        # its decoder's config); selfattn's layers have it in the encoder-decoder shape alone.
        if getattr(self, "add_cross_attention", False) and not (self.encoder_layers > 0 and self.decoder_layers > 0):
            raise ValueError(
                f"SelfAttnConfig(add_cross_attention=True) with encoder_layers={self.encoder_layers} and "
                f"decoder_layers={self.decoder_layers}: only the encoder-decoder shape has cross-attention, and this "
                "one would ignore it. For a decoder attending to an encoder's output set both depths > 0 "
                "(SelfAttnForConditionalGeneration); a decoder-only model is SelfAttnForCausalLM (encoder_layers=0); "
                "otherwise leave add_cross_attention out."
            )
        self.check_source_config()
        keys = self.attention_keys()
        for key, heads in (self.pruned_heads or {}).items():
            if key not in keys:
                raise ValueError(
                    f"SelfAttnConfig.pruned_heads has the key {key!r}, which names no attention of this shape; keys "
                    f"are {keys}. Leave pruned_heads as model.prune_heads wrote it."
                )
            if sorted(set(heads)) != heads or not all(0 <= head < self.num_attention_heads for head in heads):
                raise ValueError(
                    f"SelfAttnConfig.pruned_heads[{key!r}] = {heads}: it must list distinct heads in increasing order, "
                    f"each within 0..{self.num_attention_heads - 1}. Leave pruned_heads as model.prune_heads wrote it."
                )

    def check_source_config(self):
        """`source_config` must be a record config.json can hold: field names to JSON values. (That it is a dict,
        @strict checks on creation and on assignment.)"""
        record = self.source_config
        if record is None:
            return
        not_names = [key for key in record if not isinstance(key, str)]
        if not_names:
            raise ValueError(
                f"SelfAttnConfig.source_config keys are config.json field names (str), got {not_names!r}; config.json "
                "would write them as other keys than given."
            )
        for key, value in record.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"SelfAttnConfig.source_config[{key!r}] = {value!r} is not a JSON value ({error}), so config.json "
                    "cannot hold it; give numbers, strings, booleans, None, or lists and dicts of them."
                ) from error


def attention_key(stack: str, layer: int, cross_attention: bool = False) -> str:
    """The name of one attention module in `pruned_heads`: "encoder.L", "decoder.L" or "decoder.L.cross_attn"."""
    return f"{stack}.{layer}.cross_attn" if cross_attention else f"{stack}.{layer}"


__all__ = ["SelfAttnConfig"]
