"""Curate stage: PII scrubbing (real Presidio), filters, duplicates, report."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest

from factory.curate import CurateConfig, curate
from factory.records import Record, content_id

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAx4UbaDzY5xjW9x2fqL0ZNb7q\n"
    "Zx1yQk3Fv9W0tT8RfZ2bC5hJ7dE6nL4mK1pS3uV0\n"
    "-----END RSA PRIVATE KEY-----"
)
# planted value -> fragments that must not survive anywhere in a serialized row
CANARIES = {
    "jane.doe@example.com": ["jane.doe@example.com", "jane.doe"],
    "4111 1111 1111 1111": ["4111 1111", "1111 1111 1111"],
    "4111-1111-1111-1111": ["4111-1111", "1111-1111-1111", "4111111111111111"],
    "(212) 555-0147": ["555-0147"],
    "212-555-0198": ["555-0198"],
    "+1 415 555 0132": ["555 0132"],
    "+1-611-279-2215": ["279-2215"],  # unassigned area codes: phonenumbers
    "371.483.2287": ["483.2287"],  # rejects these, the format patterns do not
    "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv": ["Ab3dEf6hIj9kLm2nOp5qRs8tUv"],
    "AKIAIOSFODNN7EXAMPLE": ["AKIAIOSFODNN7EXAMPLE"],
    PEM: ["MIIEowIBAAKCAQEAx4UbaDzY", "Zx1yQk3Fv9W0tT8RfZ2bC5hJ", "PRIVATE KEY"],
    "GB82 WEST 1234 5698 7654 32": ["WEST 1234", "5698 7654"],
    "203.0.113.42": ["203.0.113.42"],
    "536-22-8479": ["536-22-8479"],
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a": ["16C7e42F292c6912E7710c838347Ae178B4a"],
    "xoxb-2048-4096-AbCdEfGhIjKl": ["AbCdEfGhIjKl"],
    "Bearer abc.def-1234567890XYZabc": ["1234567890XYZabc"],
}
BENIGN = "Order A12345 costs $49.99 and ships on 2026-11-03 (invoice INV-2026-0042, 3 items, order 482913756)."


def make(messages, output_text=None, tool_calls=(), location="test.jsonl:1", **kwargs) -> Record:
    tool_calls = list(tool_calls)
    return Record(
        id=content_id(messages, [], output_text, tool_calls),
        source="openai",
        messages=messages,
        output_text=output_text,
        output_tool_calls=tool_calls,
        location=location,
        **kwargs,
    )


def chat(user: str, output: str = "Done.", system: str = "You are a helpful shop assistant.", **kwargs) -> Record:
    return make([{"role": "system", "content": system}, {"role": "user", "content": user}], output, **kwargs)


def row_text(record: Record) -> str:
    return json.dumps(record.to_row(), ensure_ascii=False)


def canary_record(**kwargs) -> Record:
    """Every canary planted in each place a record carries content."""
    values = list(CANARIES)
    text = " | ".join(values)
    messages = [
        {"role": "system", "content": f"Internal contacts: {text}"},
        {"role": "user", "content": [{"type": "text", "text": f"My details: {text}"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": json.dumps({"query": text})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": f"found: {text}"},
    ]
    calls = [{"name": "send", "arguments": {"to": values, "nested": {"body": text}, "count": 3}}]
    return make(messages, f"Sure, noted: {text}", calls, metadata={"user": values[0]}, **kwargs)


@pytest.fixture(scope="module")
def canary_result():
    return curate([canary_record(), canary_record(outcome="error")])


def test_canaries_never_survive_in_kept_or_removed(canary_result):
    assert len(canary_result.kept) == 1
    assert [reason for _, reason in canary_result.removed] == ["failed"]
    for record in [*canary_result.kept, *(r for r, _ in canary_result.removed)]:
        text = row_text(record)
        leaked = [frag for frags in CANARIES.values() for frag in frags if frag in text]
        assert leaked == []


def test_canaries_become_typed_placeholders(canary_result):
    record = canary_result.kept[0]
    output = record.output_text
    for placeholder in (
        "<EMAIL_1>",
        "<CREDIT_CARD_1>",
        "<PHONE_1>",
        "<PHONE_5>",
        "<API_KEY_1>",
        "<API_KEY_4>",
        "<PRIVATE_KEY_1>",
        "<IBAN_1>",
        "<IP_ADDRESS_1>",
        "<SSN_1>",
        "<AUTH_TOKEN_1>",
    ):
        assert placeholder in output
    # the two spellings of one card number are one value
    assert "<CREDIT_CARD_2>" not in row_text(record)
    assert record.output_tool_calls[0]["arguments"]["count"] == 3
    assert record.output_tool_calls[0]["arguments"]["to"][0] == "<EMAIL_1>"
    assert record.messages[2]["tool_calls"][0]["id"] == "call_1"
    assert record.metadata == {"user": "<EMAIL_1>"}
    # per record: each value once, but the PEM block twice, as the JSON-escaped
    # copy in the assistant's tool-call arguments string is a different value
    assert canary_result.report["pii_placeholders"] == {
        "API_KEY": 8,
        "AUTH_TOKEN": 2,
        "CREDIT_CARD": 2,
        "EMAIL": 2,
        "IBAN": 2,
        "IP_ADDRESS": 2,
        "PHONE": 10,
        "PRIVATE_KEY": 4,
        "SSN": 2,
    }


def test_id_is_recomputed_on_scrubbed_content(canary_result):
    record = canary_result.kept[0]
    assert record.id == content_id(record.messages, record.tools, record.output_text, record.output_tool_calls)
    assert record.id != canary_record().id


def test_placeholders_are_consistent_within_a_record():
    record = chat(
        "Write to ann@example.com, cc bob@example.org, then ann@example.com again.",
        output="Sent to ANN@example.com and bob@example.org.",
        system="Escalations go to bob@example.org.",
    )
    kept = curate([record]).kept[0]
    assert kept.messages[0]["content"] == "Escalations go to <EMAIL_1>."
    assert kept.messages[1]["content"] == "Write to <EMAIL_2>, cc <EMAIL_1>, then <EMAIL_2> again."
    assert kept.output_text == "Sent to <EMAIL_2> and <EMAIL_1>."


def test_numbering_restarts_per_record():
    result = curate([chat("mail a@example.com"), chat("mail b@example.com please")])
    assert [r.messages[1]["content"] for r in result.kept] == ["mail <EMAIL_1>", "mail <EMAIL_1> please"]


def test_ordinary_numbers_survive():
    result = curate([chat(BENIGN, output=f"Confirmed: {BENIGN}")])
    assert result.kept[0].messages[1]["content"] == BENIGN
    assert result.kept[0].output_text == f"Confirmed: {BENIGN}"
    assert result.report["pii_placeholders"] == {}


def test_bare_nine_digits_are_an_ssn_only_next_to_a_context_word():
    kept = curate([chat("My SSN is 536228479.", output="Order 482913756 is late.")]).kept[0]
    assert kept.messages[1]["content"] == "My SSN is <SSN_1>."
    assert kept.output_text == "Order 482913756 is late."


# --- structure: argument names and nearby words are context; PII in the output only -----------


def test_structured_arguments_keep_their_values_and_phone_fields_are_scrubbed():
    question = "Book a table for 07-20-2022 and text +1 415 555 0132 the booking 123-456-7890."
    args = {"to_date": "07-20-2022", "order_id": "123-456-7890", "version": "2.4.1.0", "amount": "1,299.00",
            "phone": "+1 415 555 0132"}
    result = curate([make([{"role": "user", "content": question}], tool_calls=[tool_call("book", **args)])])
    (kept,) = result.kept
    assert kept.messages[0]["content"] == "Book a table for 07-20-2022 and text <PHONE_1> the booking 123-456-7890."
    assert kept.output_tool_calls[0]["arguments"] == {**args, "phone": "<PHONE_1>"}


def test_dates_ids_and_dotted_codes_in_prose_are_not_phones_or_ips():
    text = ("Orders 07-20-2022 to 08-19-2022: order 871-889-8359 for 3,164.00, upgrade to version 2.4.1.0, "
            "OID 1.3.6.1.4.1.11659. Call (415) 555-0132 from 203.0.113.9.")
    (kept,) = curate([chat(text, output="Noted.")]).kept
    assert kept.messages[1]["content"] == text.replace("(415) 555-0132", "<PHONE_1>").replace("203.0.113.9",
                                                                                             "<IP_ADDRESS_1>")


def test_arithmetic_on_amounts_in_a_call_is_not_a_phone():
    """A `calculate` call's expression (found on the long-policy fixture: 4 of 23 quarantined as PII)."""
    for expression in ("123.11 - 155.53", "157.51 - 157.05", "100 - 155.53 + 2.5"):
        record = make([{"role": "user", "content": "What is the difference?"}], output_text=None,
                      tool_calls=[tool_call("calculate", expression=expression)])
        (kept,) = curate([record]).kept
        assert kept.output_tool_calls[0]["arguments"] == {"expression": expression}


def test_a_call_written_as_code_keeps_the_placeholder_of_its_request():
    record = make([{"role": "user", "content": "My email address is user4@example.com."},
                   {"role": "tool", "tool_call_id": "call_1", "content": "1683.29"}],
                  output_text="RegisterUser(username='user4', email='user4@example.com'); your balance is 1683.29")
    (kept,) = curate([record]).kept
    assert kept.output_text == "RegisterUser(username='user4', email='<EMAIL_1>'); your balance is 1683.29"
    assert kept.messages[1]["content"] == "1683.29"


def test_pii_written_in_the_output_only_is_quarantined_naming_the_field(tmp_path):
    import pyarrow.parquet as pq

    from factory.curate import curate_store
    from factory.records import to_table

    invented = make([{"role": "user", "content": "Email the receipt to the customer."}],
                    tool_calls=[tool_call("send_receipt", to="jane.doe@example.com", date="07-20-2022")])
    result = curate([invented])
    assert result.kept == [] and [why for _, why in result.removed] == ["pii_in_output_only"]
    assert result.removed[0][0].output_tool_calls[0]["arguments"]["to"] == "<EMAIL_1>"
    assert result.report["removed"]["pii_in_output_only"] == 1
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(to_table([invented]), raw / "a.parquet")
    report = curate_store(raw, tmp_path / "curated.parquet", tmp_path / "curate.jsonl", tmp_path / "report.json")
    (row,) = [json.loads(line) for line in (tmp_path / "curate.jsonl").read_text().splitlines()]
    assert (row["reason"], row["detail"]) == ("pii_in_output_only", "output_tool_calls[0].arguments.to: EMAIL")
    assert "jane.doe" not in json.dumps(row) and report["removed"]["pii_in_output_only"] == 1


def test_a_value_the_input_holds_shares_its_placeholder_with_the_output():
    shared = make([{"role": "user", "content": "Text me at 415-555-0132 about it, and mail ann@example.com."}],
                  output_text="I will text ANN@example.com's phone 415-555-0132.")
    (kept,) = curate([shared]).kept
    assert kept.messages[0]["content"] == "Text me at <PHONE_1> about it, and mail <EMAIL_1>."
    assert kept.output_text == "I will text <EMAIL_1>'s phone <PHONE_1>."
    # no recognizer takes "555 0132 77" in the question; the phone argument names it, so both get a placeholder
    named = make([{"role": "user", "content": "My order A12345 is late, ring me on 555 0132 77 please."}],
                 tool_calls=[tool_call("notify", phone="555 0132 77", order_id="A12345")])
    (kept,) = curate([named]).kept
    assert kept.messages[0]["content"] == "My order A12345 is late, ring me on <PHONE_1> please."
    assert kept.output_tool_calls[0]["arguments"] == {"phone": "<PHONE_1>", "order_id": "A12345"}


def test_failed_and_negative_feedback_are_removed_with_reasons():
    records = [
        chat("one", outcome="error"),
        chat("two", feedback=-0.5),
        chat("three", feedback=0.0),
        chat("four", feedback=None),
    ]
    result = curate(records)
    assert [(r.messages[1]["content"], why) for r, why in result.removed] == [
        ("one", "failed"),
        ("two", "negative_feedback"),
    ]
    assert [r.messages[1]["content"] for r in result.kept] == ["three", "four"]


def test_failed_and_negative_feedback_can_be_kept():
    config = CurateConfig(drop_failed=False, drop_negative_feedback=False)
    result = curate([chat("one", outcome="error"), chat("two", feedback=-1.0)], config)
    assert len(result.kept) == 2


def test_calls_a_specialist_answered_are_not_trained_on_but_escalations_are():
    served = chat("one", metadata={"route": "specialist", "confidence": 0.97})
    escalated = chat("two", metadata={"route": "upstream", "confidence": 0.2})
    result = curate([served, escalated])
    assert [(r.messages[1]["content"], why) for r, why in result.removed] == [("one", "served_by_specialist")]
    assert [r.messages[1]["content"] for r in result.kept] == ["two"]


def test_exact_duplicates_keep_the_first_seen():
    first = chat("Where is my order A12345?", location="a.jsonl:1")
    again = chat("Where is my order A12345?", location="b.jsonl:9")
    result = curate([first, again])
    assert [r.location for r in result.kept] == ["a.jsonl:1"]
    assert [(r.location, why) for r, why in result.removed] == [("b.jsonl:9", "duplicate")]


def test_records_differing_only_in_pii_are_duplicates_after_scrubbing():
    result = curate([chat("Reset the password for ann@example.com"), chat("Reset the password for bob@example.org")])
    assert [why for _, why in result.removed] == ["duplicate"]


def test_whitespace_and_case_variants_are_near_duplicates():
    user = "Where is my order A12345? It was due yesterday and the tracking page shows nothing at all."
    variant = "  WHERE is my order   a12345?\nIt was due yesterday and the tracking page shows NOTHING at all. "
    result = curate([chat(user, output="Let me check."), chat(variant, output="let me  check.")])
    assert [why for _, why in result.removed] == ["near_duplicate"]


def test_different_requests_sharing_a_long_system_prompt_are_kept():
    system = " ".join(f"Rule {i}: be polite, concise and accurate when you answer customers." for i in range(40))
    records = [
        chat("Where is my order A12345? It was due yesterday.", output="It ships today.", system=system),
        chat("Can I return a kettle I bought last month?", output="Yes, within 60 days.", system=system),
        chat("Do you ship to Canada, and how long does it take?", output="Yes, 5-7 days.", system=system),
    ]
    result = curate(records)
    assert len(result.kept) == 3


def test_typos_are_near_duplicates_with_char_shingles_or_a_lower_threshold():
    user = "Hi, I would like to cancel my order A12345 for the blue kettle because it arrived with a cracked lid."
    output = "I am sorry to hear that. I have cancelled order A12345 and refunded the full amount to your card."
    records = [chat(user, output=output), chat(user.replace("cracked", "craked"), output=output)]
    assert len(curate(records).kept) == 2  # word 3-shingles: Jaccard ~0.87
    assert len(curate(records, CurateConfig(near_dup_shingle="char")).kept) == 1  # ~0.96
    assert len(curate(records, CurateConfig(near_dup_threshold=0.8)).kept) == 1


# --- near duplicates on the whole call: latest turns, output, tool calls, session turns ---

SUPPORT = "You are Acme's support assistant. Check orders before you answer."
COMPLAINT = (
    "Hello, I ordered a standing desk three weeks ago as a birthday present for my partner and the tracking "
    "page has not changed since last Monday, it still says the parcel left the warehouse in Denver and "
    "nothing else. I have emailed twice and nobody answered, I took a day off work to wait for the courier "
    "who never came, and the birthday is on Saturday so I am getting worried that it will not arrive in time. "
    "The order number is A12345 and I paid for express delivery, which I expected to take two days at most. "
    "Could you please tell me where the parcel is right now and when it will be delivered to my address? "
    "Here is what the order confirmation lists: "
) + " ".join(f"line {i}: {item}, quantity {i % 3 + 1}, price ${5 * i}.00;" for i, item in enumerate(
    ["desk frame", "desk top", "cable tray", "monitor arm", "footrest", "lamp", "chair mat", "drawer"] * 8, 1))


def tool_call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def assistant_call(call_id: str, call: dict) -> dict:
    function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
    return {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function",
                                                                  "function": function}]}


def dialogue_turns(session_id: str = "sess-1") -> list[Record]:
    """Four logged calls of one conversation, each request the conversation so far."""
    status = tool_call("get_order_status", order_id="A12345")
    refund = tool_call("issue_refund", order_id="A12345", amount=20.0)
    reply = "Order A12345 shipped from Denver and should arrive on 2026-11-05, before Saturday."
    history = [{"role": "system", "content": SUPPORT}, {"role": "user", "content": COMPLAINT}]
    turns = [(status, None)]
    history_2 = [*history, assistant_call("call_1", status),
                 {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped", "eta": "2026-11-05"}'}]
    turns.append((None, reply))
    history_3 = [*history_2, {"role": "assistant", "content": reply},
                 {"role": "user", "content": "Thanks. Could you refund the $20 express fee then?"}]
    turns.append((refund, None))
    history_4 = [*history_3, assistant_call("call_2", refund),
                 {"role": "tool", "tool_call_id": "call_2", "content": '{"refunded": 20.0}'}]
    turns.append((None, "I have refunded the $20 express fee for order A12345."))
    requests = [history, history_2, history_3, history_4]
    return [make(messages, text, [call] if call else [], session_id=session_id, location=f"chat.jsonl:{i}")
            for i, (messages, (call, text)) in enumerate(zip(requests, turns), 1)]


def test_turns_of_one_dialogue_sharing_its_history_are_kept():
    result = curate(dialogue_turns())
    assert [r.location for r in result.kept] == [f"chat.jsonl:{i}" for i in range(1, 5)]
    assert result.removed == []


def test_one_dialogue_may_repeat_a_turn_later_on():
    first = make([{"role": "user", "content": "Is order A12345 still processing?"}],
                 tool_calls=[tool_call("get_order_status", order_id="A12345")], session_id="sess-9")
    later = make([*first.messages, assistant_call("call_1", first.output_tool_calls[0]),
                  {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "processing"}'},
                  {"role": "assistant", "content": "It is still processing."},
                  {"role": "user", "content": "Is order A12345 still processing?"}],
                 tool_calls=first.output_tool_calls, session_id="sess-9")
    assert len(curate([first, later]).kept) == 2
    # the same latest turn and output in another conversation is a near duplicate
    elsewhere = make(later.messages, tool_calls=later.output_tool_calls, session_id="sess-10")
    assert [why for _, why in curate([first, elsewhere]).removed] == ["near_duplicate"]


def test_templated_questions_with_other_argument_values_are_kept():
    template = ("Please convert {amount} {source} to {target} at today's rate for the quarterly expense report "
                "of the Denver office, rounded to cents, and use the mid-market rate the finance team asked for.")
    values = [(120, "USD", "EUR"), (125, "USD", "EUR"), (120, "USD", "GBP"), (120, "CAD", "EUR")]
    records = [chat(template.format(amount=a, source=s, target=t), output=None,
                    tool_calls=[tool_call("convert_currency", amount=a, source=s, target=t)]) for a, s, t in values]
    assert len(curate(records, CurateConfig(near_dup_shingle="char")).kept) == 4
    renamed = [chat(template.format(amount=120, source="USD", target="EUR"), output=None, tool_calls=[call])
               for call in (tool_call("convert_currency", amount=120, source="USD", target="EUR"),
                            tool_call("quote_currency", amount=120, source="USD", target="EUR"))]
    assert len(curate(renamed).kept) == 2


def tool(name: str, *parameters: str, description: str = "") -> dict:
    properties = {p: {"type": "string"} for p in parameters}
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties}}}


def test_the_same_question_offered_other_tools_is_kept_and_a_retry_with_the_same_tools_is_not():
    question = [{"role": "user", "content": "What is the weather in Paris tomorrow morning, and should I take an "
                                            "umbrella to the office or will a light jacket be enough for the walk?"}]
    call = [tool_call("get_weather", city="Paris", day="tomorrow")]
    weather = tool("get_weather", "city", "day", description="Weather for a city.")
    offered = [[weather], [weather, tool("get_time", "city"), tool("search", "query"), tool("book", "when")],
               [tool("get_weather", "city", "day", "units")]]
    records = [replace(make(question, tool_calls=call), tools=tools) for tools in offered]
    assert len(curate(records).kept) == 3
    retried = replace(make([{"role": "user", "content": question[0]["content"].upper() + " "}], tool_calls=call),
                      tools=[tool("get_weather", "day", "city", description="Weather forecast for a city.")])
    result = curate([records[0], retried])
    assert [why for _, why in result.removed] == ["near_duplicate"]


def test_a_retried_turn_with_a_trivial_change_is_a_near_duplicate():
    first, second, third, fourth = dialogue_turns()
    retried = make([*third.messages[:-1], {"role": "user", "content": "thanks.  could you refund the $20 "
                                                                      "EXPRESS fee then? "}],
                   tool_calls=third.output_tool_calls, session_id=third.session_id, location="retry.jsonl:1")
    result = curate([first, second, third, retried, fourth])
    assert [(r.location, why) for r, why in result.removed] == [("retry.jsonl:1", "near_duplicate")]


def test_too_long_records_are_removed():
    def count_words(text: str) -> int:
        return len(text.split())

    records = [chat("short"), chat(" ".join(["word"] * 50))]
    result = curate(records, CurateConfig(max_tokens=30), count_tokens=count_words)
    assert [why for _, why in result.removed] == ["too_long"]
    assert result.kept[0].messages[1]["content"] == "short"


def test_max_tokens_needs_a_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        curate([chat("hi")], CurateConfig(max_tokens=10))


def test_unknown_config_values_raise():
    with pytest.raises(ValueError):
        CurateConfig(near_dup_shingle="sentence")
    with pytest.raises(ValueError):
        CurateConfig(drop_errors=True)


def test_report_counts_add_up_and_input_may_be_a_generator():
    def records():
        yield chat("alpha question about shipping times to Canada")
        yield chat("alpha question about shipping times to Canada")
        yield chat("ALPHA question about shipping   times to canada")
        yield chat("beta", outcome="error")
        yield chat("gamma", feedback=-1.0)
        yield chat("delta: call me at 212-555-0147")

    report = curate(records()).report
    assert report["read"] == 6
    assert report["kept"] == 2
    assert report["removed"] == {
        "failed": 1,
        "negative_feedback": 1,
        "served_by_specialist": 0,
        "too_long": 0,
        "pii_in_output_only": 0,
        "duplicate": 1,
        "near_duplicate": 1,
    }
    assert report["kept"] + sum(report["removed"].values()) == report["read"]
    assert report["pii_placeholders"] == {"PHONE": 1}


# --- the stored stage: Parquet in, curated Parquet + quarantine + report out -----


def test_curate_store_sorts_by_time_streams_out_and_scrubs_the_quarantine(tmp_path):
    import pyarrow.parquet as pq

    from factory.curate import curate_store
    from factory.records import to_table

    raw = tmp_path / "raw"
    raw.mkdir()
    late = chat("Where is order A12345? Mail me at ann@example.com", timestamp="2026-11-03T10:00:00.000000Z")
    early = chat("Where is order A12345? Mail me at bob@example.org", timestamp="2026-11-03T09:00:00.000000Z")
    failed = chat("card 4111 1111 1111 1111 declined", outcome="error", timestamp="2026-11-03T08:00:00.000000Z")
    pq.write_table(to_table([late]), raw / "b.parquet")
    pq.write_table(to_table([early, failed]), raw / "a.parquet")
    report = curate_store(raw, tmp_path / "curated.parquet", tmp_path / "curate.jsonl", tmp_path / "report.json",
                          batch_size=1)
    kept = pq.read_table(tmp_path / "curated.parquet").to_pylist()
    assert [row["timestamp"] for row in kept] == ["2026-11-03T09:00:00.000000Z"]  # the earlier duplicate wins
    removed = [json.loads(x) for x in (tmp_path / "curate.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["timestamp"][11:13]) for r in removed] == [("failed", "08"), ("duplicate", "10")]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["read"] == 3 and report["kept"] == 1 and report["pii_placeholders"] == {"CREDIT_CARD": 1, "EMAIL": 2}
    for path in (tmp_path / "curated.parquet", tmp_path / "curate.jsonl"):
        text = path.read_bytes().decode("utf-8", "replace")
        assert "example.com" not in text and "example.org" not in text and "4111" not in text
    assert not list(tmp_path.glob(".*.tmp"))


def test_curate_store_keeps_the_quarantine_private(tmp_path):
    import stat

    import pyarrow.parquet as pq

    from factory.curate import curate_store
    from factory.records import to_table

    raw, quarantine = tmp_path / "raw", tmp_path / "quarantine" / "curate.jsonl"
    raw.mkdir()
    pq.write_table(to_table([chat("card 4111 1111 1111 1111 declined", outcome="error")]), raw / "a.parquet")
    quarantine.parent.mkdir(mode=0o755)
    stale = quarantine.with_name(f".{quarantine.name}.tmp")  # left behind by a killed run
    stale.write_text("old\n")
    stale.chmod(0o644)
    curate_store(raw, tmp_path / "curated.parquet", quarantine, tmp_path / "report.json")
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o600
    assert stat.S_IMODE(quarantine.parent.stat().st_mode) == 0o700
    assert [json.loads(x)["reason"] for x in quarantine.read_text().splitlines()] == ["failed"]


def test_max_tokens_counts_with_the_base_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from factory.curate import token_counter

    count = token_counter(str(tiny_model_dir))
    text = "Where is my order A12345? It was due yesterday."
    assert count(text) == len(AutoTokenizer.from_pretrained(tiny_model_dir)(text, add_special_tokens=False).input_ids)
    records = [chat("short"), chat(" ".join(["order"] * 200))]
    result = curate(records, CurateConfig(max_tokens=100), count_tokens=count)
    assert [why for _, why in result.removed] == ["too_long"]


def test_cli_curate_loads_the_tokenizer_only_for_max_tokens(tmp_path, monkeypatch, tiny_model_dir):
    from pathlib import Path

    from typer.testing import CliRunner

    import factory.curate as curate_module
    from factory.cli import app

    fixtures = Path(__file__).parent / "fixtures" / "formats"
    monkeypatch.setenv("FACTORY_DATA_DIR", str(tmp_path / "datasets"))
    loaded = []
    real = curate_module.token_counter
    monkeypatch.setattr(curate_module, "token_counter", lambda name=None: loaded.append(name) or real(name))
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(fixtures / "openai_calls.jsonl")]).exit_code == 0
    plain = runner.invoke(app, ["curate"])
    assert plain.exit_code == 0, plain.output
    assert loaded == [] and "kept 3 of 4" in plain.output
    limited = runner.invoke(app, ["curate", "--max-tokens", "20", "--base-model", str(tiny_model_dir)])
    assert limited.exit_code == 0, limited.output
    assert loaded == [str(tiny_model_dir)]
    report = json.loads((tmp_path / "datasets" / "curate-report.json").read_text())
    assert report["removed"]["too_long"] >= 1 and report["kept"] + sum(report["removed"].values()) == 4


def test_curate_store_counts_records_on_stderr_only_when_it_is_a_terminal(tmp_path, monkeypatch, capsys, stderr):
    import pyarrow.parquet as pq

    from factory.curate import curate_store
    from factory.records import to_table

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(to_table([chat(f"Where is order A1234{i}?") for i in range(3)]), raw / "a.parquet")
    monkeypatch.setattr(sys, "stderr", stderr)
    curate_store(raw, tmp_path / "curated.parquet", tmp_path / "curate.jsonl", tmp_path / "report.json")
    drawn = stderr.getvalue()
    assert ("curate:" in drawn and "/3 " in drawn) is stderr.terminal and (drawn == "") is not stderr.terminal
    assert capsys.readouterr().out == ""  # never on stdout, where the summaries go
