"""Deploy a selfattn translator with CTranslate2 and check that it translates as generate() does.

    python examples/translate_with_ctranslate2.py --model out/multi30k --output_dir out/multi30k-ct2 \
        --data val.jsonl --source_lang en --target_lang de

The model folder (run_seq2seq.py's --output_dir) is exported to the MarianMTModel layout (`selfattn-convert export`,
in a temporary folder) and converted with CTranslate2's TransformersConverter into --output_dir, a new folder that
holds the CTranslate2 model and the tokenizer files. Then the source sentences of --data (JSON lines, each a
{"translation": {language: text}} pair, Multi30k's and the Hub's layout) are translated greedily by both: the
selfattn model's generate() (with its generation config, e.g. bad_words_ids) and CTranslate2's translate_batch,
on CPU, in float32, with the same number of threads. It prints, and writes to OUTPUT_DIR/comparison.json, how
many token sequences are identical, sacreBLEU BLEU and chrF of each against the references, and the seconds each
took (translation only: loading and tokenizing are not timed).

CTranslate2 translates as generate() does only if the model follows its rules for Marian models (README.md,
"CTranslate2"): run_seq2seq.py --train_tokenizer trains such models; the export prints a note for each rule a
model breaks. Where a sentence differs, the report gives the gap between our two best logits at the first step
where the two decodings part: gaps near zero (1e-5) are float rounding, larger ones are a bug.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# Before torch: imported after it, ctranslate2 binds torch's OpenMP runtime and torch's small ops run 20-30% slower,
# which would slow the generate() this script times. Where it is missing, main() says so once the arguments are
# checked, so that a bad argument is named first.
try:
    import ctranslate2
except ImportError:
    ctranslate2 = None
import torch
from task_metrics import translation_metrics
from transformers import AutoTokenizer, GenerationConfig

from modeling_selfattn import SelfAttnForConditionalGeneration, convert_cli
from modeling_selfattn.checkpoints import TOKENIZER_FILES

# Generation-config settings that change greedy decoding and that this script does not hand to CTranslate2.
UNMATCHED_SETTINGS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
)
# The new tokens generate() makes when neither the call nor the generation config sets a length (transformers 5
# leaves GenerationConfig().max_length unset): transformers' default max_length, 20, counted from the start token on.
GENERATE_DEFAULT_NEW_TOKENS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="selfattn translator folder (run_seq2seq.py's --output_dir)")
    parser.add_argument("--output_dir", required=True, help="new folder for the CTranslate2 model; must not exist")
    parser.add_argument("--data", required=True, help='JSON lines of {"translation": {language: text}}')
    parser.add_argument("--source_lang", required=True)
    parser.add_argument("--target_lang", required=True)
    parser.add_argument("--max_samples", type=int, default=None, help="translate the first N pairs only")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="longest translation in tokens (default: as generate() decodes: the generation config's max_new_tokens, "
        "or its max_length less the start token, or with neither, transformers' default of "
        f"{GENERATE_DEFAULT_NEW_TOKENS})",
    )
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model} holds no config.json; give the folder run_seq2seq.py wrote.")
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data} is not a file; give a JSON-lines file of translation pairs.")
    if Path(args.output_dir).exists():
        parser.error(
            f"--output_dir {args.output_dir} exists; name a new folder (the conversion never writes over an "
            "existing one)."
        )
    # max_new_tokens as generate() takes it: transformers refuses 0 (it must be greater than 0).
    for name in ("max_samples", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}.")
    return args


def read_pairs(path: str, source_lang: str, target_lang: str, limit: int | None) -> tuple[list[str], list[str]]:
    sources, references = [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(sources) == limit:
                break
            if not line.strip():
                continue
            pair = json.loads(line).get("translation")
            if not isinstance(pair, dict) or source_lang not in pair or target_lang not in pair:
                raise SystemExit(
                    f"--data {path}, line {number}: expected {{\"translation\": {{\"{source_lang}\": ..., "
                    f"\"{target_lang}\": ...}}}}, got {line.strip()[:200]}; check --source_lang / --target_lang."
                )
            sources.append(pair[source_lang])
            references.append(pair[target_lang])
    if not sources:
        raise SystemExit(f"--data {path} holds no translation pairs.")
    return sources, references


def convert(model_dir: str, output_dir: str) -> None:
    """selfattn folder -> MarianMTModel folder (temporary) -> CTranslate2 model in `output_dir`, tokenizer beside."""
    from ctranslate2.converters import TransformersConverter

    with tempfile.TemporaryDirectory() as scratch:
        marian_dir = Path(scratch) / "marian"
        if convert_cli.main(["export", model_dir, str(marian_dir), "--family", "marian"]) != 0:
            raise SystemExit(f"selfattn-convert export could not export --model {model_dir} (its error is above).")
        tokenizer_files = [name for name in TOKENIZER_FILES if (marian_dir / name).is_file()]
        TransformersConverter(str(marian_dir), copy_files=tokenizer_files).convert(output_dir)


def generate_greedy(model, tokenizer, source_ids, batch_size: int, max_new_tokens: int) -> tuple[list, float]:
    """Our greedy translations as token ids, without the start token and from </s> on; the seconds taken."""
    eos = model.config.eos_token_id
    # The length limit in the generation config's own terms: given both, transformers warns and takes
    # max_new_tokens; max_length counts the start token.
    if model.generation_config.max_new_tokens is not None:
        length_limit = {"max_new_tokens": max_new_tokens}
    else:
        length_limit = {"max_length": max_new_tokens + 1}
    translations, seconds = [], 0.0
    for start in range(0, len(source_ids), batch_size):
        batch = tokenizer.pad({"input_ids": source_ids[start : start + batch_size]}, return_tensors="pt")
        begin = time.perf_counter()
        with torch.no_grad():
            generated = model.generate(**batch, num_beams=1, do_sample=False, **length_limit)
        seconds += time.perf_counter() - begin
        # A row that ends before the longest is </s> and then padding; one that reached max_new_tokens has no </s>.
        translations.extend(row[: row.index(eos)] if eos in row else row for row in generated[:, 1:].tolist())
    return translations, seconds


def ctranslate2_greedy(output_dir: str, tokenizer, source_ids, batch_size: int, max_new_tokens: int):
    """CTranslate2's greedy translations as token ids (it returns them without </s>); the seconds taken."""
    translator = ctranslate2.Translator(
        output_dir, device="cpu", compute_type="float32", intra_threads=torch.get_num_threads()
    )
    source_tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in source_ids]
    begin = time.perf_counter()
    # max_decoding_length counts </s> as generate()'s max_new_tokens does; min_decoding_length=0 allows the empty
    # translation that generate() allows.
    results = translator.translate_batch(
        source_tokens,
        beam_size=1,
        max_batch_size=batch_size,
        max_decoding_length=max_new_tokens,
        min_decoding_length=0,
    )
    seconds = time.perf_counter() - begin
    return [tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results], seconds


def default_max_new_tokens(model) -> int:
    """The length limit generate() applies to this model, as a count of new tokens, for CTranslate2 to stop where
    generate() does."""
    config = model.generation_config
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is not None:
        return config.max_length - 1  # max_length counts the start token, which CTranslate2 does not output
    # generate() caps its own default at the model's positions, as the start token's row takes one of them.
    default = min(GENERATE_DEFAULT_NEW_TOKENS, model.config.max_position_embeddings - 1)
    print(
        f"note: the generation config sets no max_length or max_new_tokens; translating up to {default} tokens, as "
        "generate() does by default (--max_new_tokens sets another limit)."
    )
    return default


def settings_not_carried_over(generation_config) -> list[str]:
    """The UNMATCHED_SETTINGS the model's generation config sets, and bad_words_ids beyond [[pad]] (which
    CTranslate2 applies anyway: it has no <pad> to generate)."""
    default = GenerationConfig()
    names = [name for name in UNMATCHED_SETTINGS if getattr(generation_config, name, None) != getattr(default, name)]
    pad = generation_config.pad_token_id
    if generation_config.bad_words_ids not in (None, [[pad]]):
        names.append("bad_words_ids")
    return [f"{name}={getattr(generation_config, name)!r}" for name in names]


def first_split_gap(model, source_ids: list[int], ours: list[int], theirs: list[int]) -> dict:
    """Where the two decodings part: the step, and our gap between the two best logits there (the logit of <pad>,
    which neither may produce, left out)."""
    step = next((index for index, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    prefix = [model.config.decoder_start_token_id, *ours[:step]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([source_ids]), decoder_input_ids=torch.tensor([prefix])).logits
    logits = logits[0, -1]
    logits[model.config.pad_token_id] = float("-inf")
    best, second = logits.topk(2).values.tolist()
    return {"step": step, "top2_logit_gap": best - second}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if ctranslate2 is None:
        sys.exit("This script needs CTranslate2: pip install 'selfattn[ctranslate2]' (or pip install ctranslate2).")
    sources, references = read_pairs(args.data, args.source_lang, args.target_lang, args.max_samples)
    model = SelfAttnForConditionalGeneration.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else default_max_new_tokens(model)
    unmatched = settings_not_carried_over(model.generation_config)
    if unmatched:
        print(f"note: CTranslate2 is not given the generation config's {', '.join(unmatched)}; tokens may differ.")
    # The same token ids for both, truncated to the positions the model has.
    source_ids = tokenizer(sources, truncation=True, max_length=model.config.max_position_embeddings)["input_ids"]
    convert(args.model, args.output_dir)

    ours, our_seconds = generate_greedy(model, tokenizer, source_ids, args.batch_size, max_new_tokens)
    theirs, their_seconds = ctranslate2_greedy(args.output_dir, tokenizer, source_ids, args.batch_size, max_new_tokens)
    differing = [index for index, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    texts = {
        name: [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
        for name, outputs in (("generate", ours), ("ctranslate2", theirs))
    }
    scored = {name: translation_metrics(texts[name], [[text] for text in references]) for name in texts}
    report = {
        "sentences": len(sources),
        "identical": len(sources) - len(differing),
        "bleu": {name: scores["bleu"] for name, scores in scored.items()},
        "chrf": {name: scores["chrf"] for name, scores in scored.items()},
        "seconds": {"generate": our_seconds, "ctranslate2": their_seconds},
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "differing": [
            {"index": index, **first_split_gap(model, source_ids[index], ours[index], theirs[index])}
            for index in differing
        ],
    }
    (Path(args.output_dir) / "comparison.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"CTranslate2 model: {args.output_dir}")
    print(f"identical token sequences: {report['identical']} of {len(sources)}")
    for name in ("generate", "ctranslate2"):
        print(
            f"{name}: BLEU {report['bleu'][name]:.2f}, chrF {report['chrf'][name]:.2f}, "
            f"{report['seconds'][name]:.2f} s ({report['threads']} threads)"
        )
    for split in report["differing"]:
        gap = split["top2_logit_gap"]
        print(f"sentence {split['index']}: the two part at step {split['step']}, our top-2 logit gap {gap:.2e}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
