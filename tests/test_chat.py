"""factory.chat: rendering logged conversations for SmolLM2 and the GPU recipes' templates, and parsing answers.

The Qwen2.5, Llama-3.1 and Mistral-v0.3 chat templates are fixtures (tests/fixtures/chat_templates/,
as their tokenizer configs ship them), set on the SmolLM2 tokenizer: rendering needs only the
template and the special tokens' text, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from factory import chat
from factory.models import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
TEMPLATES = ["qwen2.5-instruct", "llama-3.1-instruct", "mistral-7b-instruct-v0.3"]
SYSTEM = "Route the customer's request: answer with the tool to call."
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "description": "Look up an order.",
                                           "parameters": {"type": "object", "required": ["order_id"], "properties": {
                                               "order_id": {"type": "string", "description": "Order id, e.g. A1"},
                                               "verbose": {"type": "boolean", "default": False}}}}},
         {"type": "function", "function": {"name": "cancel_order", "parameters": {
             "type": "object", "properties": {"order_id": {"type": "string"},
                                              "reason": {"type": "string", "enum": ["late", "other"]}}}}}]
LLAMA_STYLE = (  # a minimal template that renders tool calls itself, as Llama 3.1's does
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{{ '{\"name\": \"' + m.tool_calls[0].function.name + '\", \"parameters\": ' }}"
    "{{ m.tool_calls[0].function.arguments | tojson }}}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# a dialogue as OpenAI clients log it: a call with null content, its result, a reply, a new question
DIALOGUE = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": [{"type": "text", "text": "Where is my order A12345?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_order_status", "arguments": "{\"order_id\": \"A12345\"}"}}]},
    {"role": "tool", "tool_call_id": "call_abc", "name": "get_order_status",
     "content": "{\"status\": \"shipped\", \"eta\": \"2026-11-08\"}"},
    {"role": "assistant", "content": "It has shipped and arrives on 2026-11-08."},
    {"role": "user", "content": "Then cancel it please."},
]
CALL = {"content": None, "tool_calls": [{"name": "cancel_order", "arguments": {"order_id": "A12345"}}]}
REPLY = {"content": "A shipped order cannot be cancelled; you can return it within 30 days.", "tool_calls": []}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _with_template(tokenizer, name: str):
    fixture = json.loads((FIXTURES / f"{name}.json").read_text())
    other = copy.deepcopy(tokenizer)
    other.chat_template = fixture["chat_template"]
    other.eos_token = fixture["eos_token"]
    if fixture["bos_token"]:
        other.bos_token = fixture["bos_token"]
    return other


def test_fallback_tool_calls_render_as_hermes_text_and_parse_back(tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is A1?"}]
    completion = chat.render_completion(tokenizer, messages, TOOLS, CALL)
    assert completion == chat.render_output(CALL) + tokenizer.eos_token
    assert "<tool_call>" in completion
    assert chat.parse_output(completion.removesuffix(tokenizer.eos_token)) == CALL


def test_template_tool_format_is_used_where_the_template_has_one(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = LLAMA_STYLE
    messages = [{"role": "user", "content": "Cancel A12345"}]
    completion = chat.render_completion(other, messages, TOOLS, CALL)
    assert completion.startswith('{"name": "cancel_order", "parameters": {"order_id": "A12345"}}')
    assert completion.endswith(other.eos_token) and "<tool_call>" not in completion
    assert chat.parse_output(completion.removesuffix(other.eos_token)) == CALL


def test_parse_output_reads_mistral_calls_and_leaves_json_answers_alone():
    mistral = '[TOOL_CALLS] [{"name": "cancel_order", "arguments": {"order_id": "A1"}, "id": "call00000"}]'
    assert chat.parse_output(mistral)["tool_calls"] == [{"name": "cancel_order", "arguments": {"order_id": "A1"}}]
    extraction = '{"name": "water filter", "issue": "leaks"}'
    assert chat.parse_output(extraction) == {"content": extraction, "tool_calls": []}
    assert chat.parse_output("billing") == {"content": "billing", "tool_calls": []}
    assert chat.parse_output("") == {"content": "", "tool_calls": []}


def test_no_default_system_prompt_is_injected(tokenizer):
    user = [{"role": "user", "content": "Where is A1?"}]
    assert "SmolLM" in tokenizer.apply_chat_template(user, tokenize=False)  # what the template would add
    prompt = chat.render_prompt(tokenizer, user, [])
    assert "SmolLM" not in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_features_are_found_by_rendering(tokenizer):
    assert chat.features(tokenizer) == chat.Features(tools=False, tool_calls=False, injects_system=True)
    for name in TEMPLATES:
        feats = chat.features(_with_template(tokenizer, name))
        assert feats.tools and feats.tool_calls, name


def test_a_template_that_ignores_tools_gets_them_in_the_system_prompt(tokenizer):
    prompt = chat.render_prompt(tokenizer, DIALOGUE[:2], TOOLS)
    system = prompt.split("<|im_end|>")[0]
    assert SYSTEM in system and "- get_order_status(order_id: string (Order id, e.g. A1), verbose?: boolean = false)" \
        in system and 'reason?: "late"|"other"' in system and "<tool_call>" in system
    # a per-call tool list reaches the prompt: another list, another prompt
    assert "cancel_order" not in chat.render_prompt(tokenizer, DIALOGUE[:2], TOOLS[:1])


def test_multi_turn_history_renders_on_smollm2(tokenizer):
    """An assistant turn with tool_calls and null content used to crash SmolLM2's template."""
    prompt = chat.render_prompt(tokenizer, DIALOGUE, TOOLS)
    assert '<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "A12345"}}\n</tool_call>' in prompt
    assert '"status": "shipped"' in prompt and "Where is my order A12345?" in prompt
    assert prompt.endswith("Then cancel it please.<|im_end|>\n<|im_start|>assistant\n")
    for output in (CALL, REPLY):
        completion = chat.render_completion(tokenizer, DIALOGUE, TOOLS, output)
        assert chat.parse_output(completion.removesuffix(tokenizer.eos_token)) == output


@pytest.mark.parametrize("name", TEMPLATES)
def test_multi_turn_history_renders_with_the_gpu_recipes_templates(tokenizer, name):
    other = _with_template(tokenizer, name)
    prompt = chat.render_prompt(other, DIALOGUE, TOOLS)
    assert "get_order_status" in prompt and "2026-11-08" in prompt and "Then cancel it please." in prompt
    for output in (CALL, REPLY):
        completion = chat.render_completion(other, DIALOGUE, TOOLS, output)
        assert completion.endswith(other.eos_token)
        parsed = chat.parse_output(completion.removesuffix(other.eos_token).strip())
        assert parsed == output if output is CALL else parsed["content"] == output["content"]


def test_mistral_gets_nine_character_call_ids_that_tie_results_to_calls(tokenizer):
    prompt = chat.render_prompt(_with_template(tokenizer, "mistral-7b-instruct-v0.3"), DIALOGUE, TOOLS)
    assert '"id": "call00001"' in prompt and '"call_id": "call00001"' in prompt


def test_several_calls_in_one_turn_render_where_the_template_allows_only_one(tokenizer):
    """Llama 3.1's template refuses two calls in one turn; the flattened form renders them as text."""
    two = [*DIALOGUE[:2], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_order_status", "arguments": {"order_id": "A1"}}},
        {"id": "b", "type": "function", "function": {"name": "get_order_status", "arguments": {"order_id": "A2"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "shipped"}, {"role": "tool", "tool_call_id": "b",
                                                                      "content": "lost"}]
    prompt = chat.render_prompt(_with_template(tokenizer, "llama-3.1-instruct"), two, TOOLS)
    assert '"order_id": "A2"' in prompt and "lost" in prompt


def test_a_conversation_no_template_path_renders_is_a_chat_error_with_a_reason(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ raise_exception('only one message allowed') if messages | length > 1 }}x"
    assert chat.render_prompt(other, DIALOGUE[1:2], []) == "x"
    with pytest.raises(chat.ChatError, match="only one message allowed") as err:
        chat.render_prompt(other, DIALOGUE, [])
    assert "only one message allowed" in err.value.reason


def test_fit_messages_drops_the_oldest_turns_and_keeps_system_tools_and_the_latest_turn(tokenizer):
    turns = [DIALOGUE[0]]
    for i in range(8):
        turns += [{"role": "user", "content": f"question {i} " + "about my order " * 20},
                  {"role": "assistant", "content": f"answer {i} " + "it is on its way " * 20}]
    turns.append({"role": "user", "content": "final question"})

    def length(msgs):
        return len(tokenizer(chat.render_prompt(tokenizer, msgs, TOOLS), add_special_tokens=False)["input_ids"])

    full = length(turns)
    kept, dropped = chat.fit_messages(tokenizer, turns, TOOLS, full)
    assert dropped == 0 and len(kept) == len(turns)
    budget = full // 2
    kept, dropped = chat.fit_messages(tokenizer, turns, TOOLS, budget)
    assert length(kept) <= budget < length([turns[0], *turns[len(turns) - len(kept) - 1:]])
    assert kept[0]["content"] == SYSTEM and kept[-1]["content"] == "final question"
    assert kept[1]["role"] == "user" and dropped == len(turns) - len(kept)
    assert "question 0 " not in json.dumps(kept) and "question 7 " in json.dumps(kept)
    with pytest.raises(chat.ChatError, match="too long"):
        chat.fit_messages(tokenizer, turns, TOOLS, 10)


def test_fit_messages_drops_old_call_steps_of_one_long_turn_but_never_orphans_a_result(tokenizer):
    steps = [DIALOGUE[0], {"role": "user", "content": "Check all my orders."}]
    for i in range(6):
        steps += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "get_order_status",
                                                            "arguments": {"order_id": f"A{i}"}}}]},
                  {"role": "tool", "tool_call_id": f"c{i}", "content": "shipped " * 40}]
    full = len(tokenizer(chat.render_prompt(tokenizer, steps, TOOLS), add_special_tokens=False)["input_ids"])
    kept, dropped = chat.fit_messages(tokenizer, steps, TOOLS, full * 2 // 3)
    assert dropped > 0 and kept[1]["content"] == "Check all my orders." and kept[2]["role"] == "assistant"
    assert '"A5"' in json.dumps(kept) and '"A0"' not in json.dumps(kept)


def test_a_policy_is_named_by_its_system_prompt_and_tools_and_a_changed_one_is_refused():
    tools = [{"type": "function", "function": {"name": "find_order", "parameters": {"type": "object"}}}]
    conversation = [{"role": "system", "content": "Policy v1."}, {"role": "user", "content": "Where is A1?"}]
    rows = [{"messages": conversation, "tools": tools}] * 9 + [{"messages": conversation, "tools": []}]
    policy = chat.task_policy(rows)
    assert policy == chat.policy_fingerprint(conversation, tools) != chat.policy_fingerprint(conversation, [])
    assert chat.task_policy(rows, share=0.95) is None and chat.task_policy(rows[:1]) is None
    assert chat.without_policy(conversation, tools, policy) == ([conversation[1]], [])
    assert chat.without_policy(conversation, tools, None) == (conversation, tools)
    reworded = [{"role": "developer", "content": "Policy v2."}, conversation[1]]
    for messages, offered in ((reworded, tools), (conversation, tools[:0]), (conversation[1:], tools)):
        with pytest.raises(chat.ChatError) as err:
            chat.without_policy(messages, offered, policy)
        assert err.value.reason == chat.POLICY_CHANGED
