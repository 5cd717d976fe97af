"""bench/routing.py's pieces that need no server: the seeded chat workload, the imbalance figure, the report."""

from __future__ import annotations

import math

from bench.routing import ChatUser, Workload, imbalance, markdown_table, pooled, targets

WORDS = [f"w{i}" for i in range(50)]


def requests_of(user: ChatUser, count: int) -> list[tuple[str, list[dict[str, str]], int]]:
    sent = []
    for turn in range(count):
        request = user.next_request()
        sent.append(request)
        user.answered(request[0], f"answer {turn}")
    return sent


def test_the_workload_is_seeded() -> None:
    workload = Workload(seed=3)
    assert requests_of(ChatUser(workload, WORDS, "sys", 1), 20) == requests_of(ChatUser(workload, WORDS, "sys", 1), 20)
    assert requests_of(ChatUser(workload, WORDS, "sys", 1), 20) != requests_of(ChatUser(workload, WORDS, "sys", 2), 20)


def test_each_chat_turn_resends_the_conversation_with_the_answers_under_the_shared_system_prompt() -> None:
    user = ChatUser(Workload(one_off_share=0.0, turns=3), WORDS, "the system prompt", 0)
    sent = requests_of(user, 4)
    assert [len(messages) for _, messages, _ in sent] == [2, 4, 6, 2]  # the fourth starts a new conversation
    assert all(messages[0] == {"role": "system", "content": "the system prompt"} for _, messages, _ in sent)
    assert sent[2][1][:4] == sent[1][1]  # the previous request, then its answer and a new message
    assert sent[2][1][4] == {"role": "assistant", "content": "answer 1"}


def test_a_share_of_requests_are_one_off_prompts_sharing_nothing() -> None:
    user = ChatUser(Workload(one_off_share=0.2), WORDS, "sys", 0)
    kinds = [kind for kind, _, _ in requests_of(user, 500)]
    assert 0.15 < kinds.count("one_off") / len(kinds) < 0.25
    one_off = next(messages for kind, messages, _ in requests_of(user, 50) if kind == "one_off")
    assert [message["role"] for message in one_off] == ["user"]


def test_imbalance_is_max_over_mean_at_saturation_only() -> None:
    ratio, count = imbalance([[4, 2], [0, 1], [3, 3]], slots=4)  # [0, 1] is below half the slots on average
    assert count == 2 and math.isclose(ratio, (4 / 3 + 1) / 2)
    assert math.isnan(imbalance([[0, 0]], slots=4)[0])


def result(router: str, hit_rate: float, p99: float, ratio: float) -> dict:
    return {"router": router, "replicas": 2, "hit_rate": hit_rate, "ttft_p50_s": 0.1, "ttft_p99_s": p99,
            "output_tok_s": 10.0, "imbalance": ratio, "predicted_hit_tokens": 90.0 if router == "ours" else None,
            "hit_tokens": 100, "requests": 10, "errors": 0}  # fmt: skip


def test_the_table_has_a_row_per_router_and_the_targets_are_judged() -> None:
    results = [result("ours", 0.6, 1.0, 1.2), result("pow2", 0.4, 1.5, 1.1), result("prefix", 0.7, 2.0, 1.9)]
    table = markdown_table(results).splitlines()
    assert len(table) == 2 + 3 and "| 2 | ours | 60.0% |" in table[2] and "90 / 100" in table[2]
    fetched = {**results[0], "imported_tokens": 25, "prompt_tokens": 200}  # of its hits, fetched from another replica
    assert "| 2 | ours | 60.0% (12.5%) |" in markdown_table([fetched]).splitlines()[2]
    verdicts = targets(results)
    assert "MISSED" in verdicts[0] and "70.0%" in verdicts[0]  # prefix's hit rate is higher
    assert verdicts[1].endswith("met") and verdicts[2].endswith("met")


def test_runs_pool_into_one_row_whose_percentiles_cover_every_request() -> None:
    def run(seed: int, ttfts: list[float], hits: int, imbalance_ratio: float) -> dict:
        return {**result("ours", hits / 200, max(ttfts), imbalance_ratio), "hit_tokens": hits, "prompt_tokens": 200,
                "imbalance_samples": 5, "requests": len(ttfts), "per_replica_prompt_tokens": [120, 80],
                "ttfts": [("chat", 0.0, t) for t in ttfts], "ttft_p99_runs_s": [max(ttfts)], "seeds": [seed]}

    first, second = run(0, [1.0] * 99 + [9.0], 100, 1.2), run(1, [2.0] * 100, 150, math.nan)
    row = pooled([first, second])
    assert row["requests"] == 200 and row["hit_tokens"] == 250 and math.isclose(row["hit_rate"], 250 / 400)
    assert row["ttft_p50_s"] == 2.0 and row["ttft_p99_s"] == 2.0  # one slow request in 200 is not the p99
    assert row["ttft_p99_runs_s"] == [9.0, 2.0] and row["seeds"] == [0, 1]
    assert row["imbalance"] == 1.2 and row["predicted_hit_tokens"] == 180.0  # runs without samples do not count
    assert row["per_replica_prompt_tokens"] == [240, 160]
    assert pooled([first]) is first
