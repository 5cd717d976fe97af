"""lm-evaluation-harness as users run it: its `local-completions` model against the served app scores a small local
task set (a multiple-choice loglikelihood task and a `generate_until` task) as its `hf` model scores the same model
directory in-process, sample by sample. No network: the tasks' data are JSON files in a temporary directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest

from tests.serve.conftest import ServedApp


QUESTIONS = [
    ("The sky is", ["blue", "green", "loud", "square"], 0),
    ("Two plus two is", ["four", "five", "seven", "nine"], 0),
    ("Fish live in", ["trees", "water", "clouds", "books"], 1),
    ("The sun rises in the", ["west", "north", "east", "south"], 2),
    ("Ice is made of", ["fire", "sand", "wood", "water"], 3),
    ("A cat says", ["meow", "moo", "quack", "oink"], 0),
    ("Snow is", ["black", "white", "red", "purple"], 1),
    ("Bees make", ["milk", "silk", "honey", "glass"], 2),
]

MC_TASK = """\
task: paged_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_TASK = """\
task: paged_serve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    data = directory / "questions.jsonl"
    rows = [{"question": q, "choices": choices, "answer": answer} for q, choices, answer in QUESTIONS]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "mc.yaml").write_text(MC_TASK.format(data=data))
    (directory / "gen.yaml").write_text(GEN_TASK.format(data=data))
    return directory


def evaluate(task_dir: Path, model: str, model_args: dict) -> dict:
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        pytest.fail('lm-evaluation-harness is missing: pip install -c <(echo torch==2.13.0) "lm-eval[api]==0.4.13"')
    from lm_eval.tasks import TaskManager

    with mock.patch.dict(os.environ, {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}):
        return simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=["paged_serve_mc", "paged_serve_gen"],
            task_manager=TaskManager(include_path=str(task_dir)),
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )


@pytest.fixture(scope="module")
def hf_results(task_dir: Path, tiny_llama_dir: Path) -> dict:
    return evaluate(task_dir, "hf", {"pretrained": str(tiny_llama_dir), "dtype": "float32", "device": "cpu",
                                     "batch_size": 1})  # fmt: skip


@pytest.fixture(scope="module")
def served_results(task_dir: Path, tiny_app: ServedApp, tiny_llama_dir: Path) -> dict:
    return evaluate(task_dir, "local-completions", {
        "model": tiny_app.model_id, "base_url": f"{tiny_app.v1}/completions", "tokenizer": str(tiny_llama_dir),
        "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1,
    })  # fmt: skip


def by_doc(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda sample: sample["doc_id"])


def test_multiple_choice_loglikelihoods_and_scores_match_transformers(hf_results: dict, served_results: dict) -> None:
    for hf_sample, served_sample in zip(by_doc(hf_results, "paged_serve_mc"), by_doc(served_results, "paged_serve_mc")):
        hf_scores = [response[0] for response in hf_sample["resps"]]
        served_scores = [response[0] for response in served_sample["resps"]]
        assert len(served_scores) == len(hf_scores) == 4
        for (hf_ll, hf_greedy), (served_ll, served_greedy) in zip(hf_scores, served_scores):
            assert abs(float(hf_ll) - float(served_ll)) < 1e-3
            assert bool(hf_greedy) == bool(served_greedy)
    for metric in ("acc,none", "acc_norm,none"):
        assert served_results["results"]["paged_serve_mc"][metric] == hf_results["results"]["paged_serve_mc"][metric]


def test_generate_until_outputs_and_scores_match_transformers(hf_results: dict, served_results: dict) -> None:
    hf_samples, served_samples = by_doc(hf_results, "paged_serve_gen"), by_doc(served_results, "paged_serve_gen")
    assert len(served_samples) == len(hf_samples) == len(QUESTIONS)
    assert [s["filtered_resps"] for s in served_samples] == [s["filtered_resps"] for s in hf_samples]
    assert any(s["filtered_resps"][0] for s in hf_samples)  # the model generated text, not only empty answers
    metric = "exact_match,none"
    assert served_results["results"]["paged_serve_gen"][metric] == hf_results["results"]["paged_serve_gen"][metric]
