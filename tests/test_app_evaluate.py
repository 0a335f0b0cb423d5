"""gora.app.tasks.classification and gora.app.tasks.sft: per-example predictions in input order, answers read from generations."""

from __future__ import annotations

import pytest

from _tiny_folders import make_tokenizer
from gora.app.tasks.classification import encode_classification, label_space
from helpers import make_bert


def test_classification_predictions_come_back_in_input_order():
    """Protects per-example predictions: evaluate_classification batches shortest first, but the predictions it keeps
    are in the order of the dataset and equal the argmax of each example run alone."""
    import torch
    from transformers import DataCollatorWithPadding

    from gora.app.tasks.classification import evaluate_classification

    tokenizer = make_tokenizer()
    texts = ["a much longer text with many words in it", "short", "a text of middling length", "two words"]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    dataset = encode_classification(
        rows, tokenizer, label_space([0, 1]), text_column="text", label_column="label", max_length=32
    )
    model = make_bert(seed=3)
    model.config.pad_token_id = tokenizer.pad_token_id
    collator = DataCollatorWithPadding(tokenizer)
    out = evaluate_classification(model, dataset, collator, batch_size=2, keep_predictions=True)
    model.eval()
    with torch.no_grad():
        alone = [int(model(**collator([ex])).logits.argmax(-1)) for ex in dataset]
    assert out["predictions"] == alone
    assert out["accuracy"] == sum(p == ex["labels"] for p, ex in zip(alone, dataset)) / len(dataset)
    assert "predictions" not in evaluate_classification(model, dataset, collator, batch_size=2)


@pytest.mark.parametrize(
    ("text", "reference", "answer", "hit"),
    [
        ("Son\nbecause ...", "son", "Son", True),  # a word: the first line, case ignored
        ("  wife.", "wife", "wife.", True),
        ("The answer is 12.", "12", "12", True),  # a number: the last number
        ("x = 3 #### 4", "4", "4", True),  # after ####
        ("mother", "mother-in-law", "mother", False),
        ("Tuesday", "1", None, False),  # a numeric reference reads numbers only
        ("1,234 apples", "1234", "1234", True),  # thousands separators
        ("The total is 1234", "1,234", "1234", True),
        ("French, PROVIDED, beauty\n", "French, PROVIDED, beauty", "French, PROVIDED, beauty", True),  # a list
        ("French, beauty, PROVIDED", "French, PROVIDED, beauty", "French, beauty, PROVIDED", False),  # order counts
        ("French PROVIDED beauty", "French, PROVIDED, beauty", "French PROVIDED beauty", False),  # commas count
    ],
)
def test_answer_of_reads_words_and_numbers(text, reference, answer, hit):
    """Protects exact match on short answers: word references are matched on the first line, ignoring case;
    numeric ones on the last number (or what follows ####), numerically; a comma-separated answer keeps its commas
    (the scorer once dropped the reference's commas only, so no list answer could match)."""
    from gora.app.tasks.sft import answer_of, same_answer

    assert answer_of(text, reference) == answer
    assert same_answer(answer_of(text, reference), reference) is hit
