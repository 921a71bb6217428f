"""free_text: any other text answer; scored by ROUGE-L, with embedding similarity reported beside it."""

from __future__ import annotations

from factory.kinds.base import Kind
from factory.metrics import embedding_similarity, mean, rouge_l


class FreeText(Kind):
    name = "free_text"
    score_name = "ROUGE-L"
    embeds = True

    def infer(self, records, max_labels):
        return {}

    def score(self, pred, ref, schema, tools):
        return rouge_l(pred.get("content") or "", ref.get("content") or "")

    def extras(self, preds, refs, schema, tools, embed):
        out = {"rouge_l": mean([self.score(p, r, schema, t) for p, r, t in zip(preds, refs, tools)])}
        if embed is not None:
            out["embedding_similarity"] = embedding_similarity(
                embed, [p.get("content") or "" for p in preds], [r.get("content") or "" for r in refs])
        return out
