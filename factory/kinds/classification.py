"""classification: the answer is one of a small set of labels (at most 4 words each).

Both scoring and `usable` compare labels stripped and case-insensitively.
"""

from __future__ import annotations

from collections import Counter

from factory.kinds.base import Kind
from factory.metrics import confusion_matrix, label_match, label_of, macro_f1

MIN_COVERAGE = 0.95  # share of outputs the frequent labels must cover


class Classification(Kind):
    name = "classification"
    score_name = "accuracy"
    binary = True

    def infer(self, records, max_labels):
        labels = Counter((r.output_text or "").strip() for r in records)
        frequent = [label for label, count in labels.most_common() if count >= 2]
        covered = sum(labels[label] for label in frequent)
        if len(frequent) <= max_labels and covered >= MIN_COVERAGE * len(records) \
                and all(len(label.split()) <= 4 for label in frequent):
            return {"labels": sorted(frequent)}
        return None

    def usable(self, output, schema, tools):
        return label_of(output) in {label.strip().casefold() for label in schema.get("labels", [])}

    def score(self, pred, ref, schema, tools):
        return label_match(pred, ref)

    def extras(self, preds, refs, schema, tools, embed):
        return {"macro_f1": macro_f1([label_of(p) for p in preds], [label_of(r) for r in refs],
                                     schema.get("labels", []))}

    def confusion(self, preds, refs, schema):
        labels, matrix = confusion_matrix(preds, refs, schema["labels"])
        return {"labels": list(labels), "matrix": [list(map(int, row)) for row in matrix]}
