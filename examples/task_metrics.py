"""Metrics computed offline with plain packages (evaluate's Hub metric scripts cannot be fetched without a
network): scikit-learn for accuracy and F1, seqeval for entity F1, sacrebleu for BLEU and chrF, rouge-score for
ROUGE, and the SQuAD v1.1 exact match and token F1 written out here."""

import collections
import re
import string

import numpy as np


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and F1: the positive class's F1 for two labels, the macro average over classes otherwise."""
    from sklearn.metrics import accuracy_score, f1_score

    average = "binary" if num_labels == 2 else "macro"
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, average=average, labels=list(range(num_labels)), zero_division=0)),
    }


def regression_metrics(predicted: np.ndarray, gold: np.ndarray) -> dict:
    """Mean squared error (what transformers' run_glue reports for regression) and Pearson's r (STS-B's measure);
    r is nan where either side is constant, as it is undefined there."""
    constant = np.std(predicted) == 0 or np.std(gold) == 0
    pearson = float("nan") if constant else float(np.corrcoef(predicted, gold)[0, 1])
    return {"mse": float(np.mean((predicted - gold) ** 2)), "pearson": pearson}


def entity_metrics(predicted_tags: list[list[str]], gold_tags: list[list[str]]) -> dict[str, float]:
    """seqeval's entity-level precision, recall and F1 (an entity counts when type and span match), and tag
    accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": float(precision_score(gold_tags, predicted_tags, zero_division=0)),
        "recall": float(recall_score(gold_tags, predicted_tags, zero_division=0)),
        "f1": float(f1_score(gold_tags, predicted_tags, zero_division=0)),
        "accuracy": float(accuracy_score(gold_tags, predicted_tags)),
    }


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(character for character in text.lower() if character not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    predicted_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    overlap = sum((collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], gold_answers: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and token F1 in percent, each the best over a question's gold answers, averaged over questions.
    Every question needs a prediction."""
    missing = sorted(set(gold_answers) - set(predictions))
    if missing:
        raise ValueError(f"No prediction for {len(missing)} questions, e.g. {missing[:3]}.")
    exact, f1 = [], []
    for question_id, answers in gold_answers.items():
        prediction = predictions[question_id]
        exact.append(max(float(normalize_answer(prediction) == normalize_answer(answer)) for answer in answers))
        f1.append(max(token_f1(prediction, answer) for answer in answers))
    return {"exact_match": 100 * float(np.mean(exact)), "f1": 100 * float(np.mean(f1))}


def translation_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """sacreBLEU's corpus BLEU and chrF on detokenised text (its default 13a tokenisation), against one or more
    references per hypothesis (the same number for each)."""
    import sacrebleu

    counts = {len(example_references) for example_references in references}
    if len(counts) != 1:
        raise ValueError(f"sacreBLEU needs the same number of references for every hypothesis, got {sorted(counts)}.")
    streams = [list(stream) for stream in zip(*references, strict=True)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(hypotheses, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(hypotheses, streams).score),
    }


def sentence_lines(text: str) -> str:
    # ROUGE-Lsum scores sentence by sentence, taking one per line; this split needs no nltk data download.
    return "\n".join(re.split(r"(?<=[.!?])\s+", text.strip()))


def rouge_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures in percent (Porter stemming), each the best over an example's references,
    averaged over examples."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for hypothesis, example_references in zip(hypotheses, references, strict=True):
        scores = scorer.score_multi([sentence_lines(text) for text in example_references], sentence_lines(hypothesis))
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100 * total / max(len(hypotheses), 1) for kind, total in totals.items()}
