"""agent_turn: a conversational step that either calls a tool or answers in text.

A router cannot know before the answer which shape it will have, so the step is one task.
Each example is scored in two parts: the action type (call or reply) must match the
reference, then the call is scored by `tool_calls_match` and the reply by ROUGE-L. A wrong
action type scores 0 whatever the content. Usable: calls to offered tools, or non-empty text.
The confidence (the answer's mean token probability) covers the decision too: the first
tokens of an answer are the ones that choose between `<tool_call>` and text.
"""

from __future__ import annotations

from factory.kinds.base import REPLY, Kind, call_action, called_tools, tool_schema
from factory.kinds.tool_call import calls_usable
from factory.metrics import embedding_similarity, mean, rouge_l, tool_calls_match

MIN_CALL_SHARE = 0.02  # below this share of calls a step is treated as text only


def _action(output) -> str:
    return "call" if output.get("tool_calls") else "reply"


class AgentTurn(Kind):
    name = "agent_turn"
    score_name = "action + call/reply"
    embeds = True

    def action(self, output):
        return call_action(output)

    def binary_action(self, action):
        """Calls score 0 or 1 (a wrong action type scores 0 too); replies score ROUGE-L."""
        return action != REPLY

    def infer(self, records, max_labels):
        calls = sum(bool(r.output_tool_calls) for r in records)
        if calls >= max(2, MIN_CALL_SHARE * len(records)):
            return {"tools": called_tools(records), "call_share": round(calls / len(records), 4)}
        return None

    def usable(self, output, schema, tools):
        if output.get("tool_calls"):
            return calls_usable(output, schema, tools)
        return bool((output.get("content") or "").strip())

    def score(self, pred, ref, schema, tools):
        if _action(pred) != _action(ref):
            return 0.0
        if _action(ref) == "call":
            return float(tool_calls_match(pred, ref, tool_schema(schema, tools)))
        return rouge_l(pred.get("content") or "", ref.get("content") or "")

    def extras(self, preds, refs, schema, tools, embed):
        calls = [i for i, r in enumerate(refs) if _action(r) == "call"]
        replies = [i for i, r in enumerate(refs) if _action(r) == "reply"]
        out = {"action_accuracy": mean([_action(p) == _action(r) for p, r in zip(preds, refs)]),
               "call_match": mean([self.score(preds[i], refs[i], schema, tools[i]) for i in calls]),
               "reply_rouge_l": mean([self.score(preds[i], refs[i], schema, tools[i]) for i in replies])}
        if embed is not None and replies:
            texts = [[outputs[i].get("content") or "" for i in replies] for outputs in (preds, refs)]
            out["reply_embedding_similarity"] = embedding_similarity(embed, *texts)
        return out

    def confusion(self, preds, refs, schema):
        """Action types: reference call/reply against predicted call/reply (every answer is one of them)."""
        labels = ["call", "reply"]
        matrix = [[sum(_action(r) == ref and _action(p) == pred for p, r in zip(preds, refs)) for pred in labels] + [0]
                  for ref in labels]
        return {"labels": labels, "matrix": matrix}
