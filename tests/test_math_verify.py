"""The math reward (math-verify equivalence of the last \\boxed{} answer), the math data sets, and the
reasoning accuracy evaluation (CurES, arXiv 2510.01037)."""

from __future__ import annotations

import json
import re
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate

from g2rpo.data import PromptDataset
from g2rpo.reasoning.datasets import EVAL_SETS, eval_set, math_dataset
from g2rpo.reasoning.evaluation import ReasoningAccuracy
from g2rpo.reasoning.verifier import MathVerifyReward, boxed_answer, extract_answer
from g2rpo.rewards.base import RewardEnsemble


def score(response: str, gold, **options) -> float:
    return float(MathVerifyReward(**options)([response], ["q"], [{"answer": gold}])[0])


EQUIVALENT = [
    (r"So the answer is $\boxed{\frac{1}{2}}$.", "0.5"),
    (r"\boxed{\dfrac12}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{1,2}", r"\{1,2\}"),
    (r"\boxed{\{2, 1\}}", "1,2"),
    (r"\boxed{[2,5)}", "[2,5)"),
    (r"\boxed{50\%}", "50"),  # the percent sign is dropped, as the MATH grader's normaliser drops it
    (r"\boxed{50\%}", r"50\%"),
    (r"\boxed{x=3}", "3"),
    (r"\boxed{1000}", "1,000"),
    (r"\boxed{\text{(C)}}", "C"),
    (r"\boxed{27}", 27.0),
    (r"\boxed{72}", "She sold 48 + 24 = 72 clips.\n#### 72"),  # a GSM8K answer as gold
    (r"\boxed{\frac{14}{3}}", r"Hence the answer is $\boxed{\dfrac{14}{3}}$."),  # a MATH solution as gold
    (r"\fbox{7}", 7),
]
NOT_EQUIVALENT = [
    (r"\boxed{3}", 4),
    (r"\boxed{1/3}", 0.33),
    (r"\boxed{x+1}", "x-1"),
    (r"\boxed{50\%}", "0.5"),  # 50 with its sign dropped, not 0.5
    (r"\boxed{\frac{\pi}{2}}", "90"),
    ("The answer is 4.", 4),  # no boxed answer
    (r"First \boxed{4}, no wait: \boxed{5}", 4),  # only the last box counts
    (r"\boxed{}", 3),
    (r"The answer is \boxed{4", 4),  # cut off inside the box
]


@pytest.mark.parametrize(("response", "gold"), EQUIVALENT)
def test_equivalent_answers_score_one(response, gold):
    assert score(response, gold) == 1.0


@pytest.mark.parametrize(("response", "gold"), NOT_EQUIVALENT)
def test_other_answers_score_zero(response, gold):
    assert score(response, gold) == 0.0


def test_the_last_box_counts_even_after_a_right_one():
    assert score(r"\boxed{4} is wrong, it is \boxed{5}", 5) == 1.0
    assert score(r"\boxed{5} is wrong, it is \boxed{4}", 5) == 0.0


def test_format_reward_pays_for_a_box_right_or_wrong():
    reward = MathVerifyReward(format_reward=0.25)
    texts = [r"\boxed{4}", r"\boxed{3}", "4"]
    assert reward(texts, ["q"] * 3, [{"answer": "4"}] * 3).tolist() == [1.25, 0.25, 0.0]
    assert reward.correctness(texts, [{"answer": "4"}] * 3).tolist() == [1.0, 0.0, 0.0]


def test_without_require_boxed_gsm8k_and_plain_answers_are_read():
    texts = ["#### 72", "The final answer is 4", "so x = 4.", "I do not know"]
    metadata = [{"answer": 72}, {"answer": 4}, {"answer": 4}, {"answer": 4}]
    loose = MathVerifyReward(require_boxed=False)(texts, ["q"] * 4, metadata)
    strict = MathVerifyReward()(texts, ["q"] * 4, metadata)
    assert loose.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert strict.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_a_missing_gold_answer_is_a_data_error_naming_the_sample_and_key():
    reward = MathVerifyReward()
    with pytest.raises(ValueError, match=r"sample 1: no gold answer under metadata\['answer'\]"):
        reward([r"\boxed{1}"] * 2, ["q"] * 2, [{"answer": "1"}, {"level": 3}])
    with pytest.raises(ValueError, match=r"sample 0: .*'solution'"):
        MathVerifyReward(answer_key="solution")([r"\boxed{1}"], ["q"], [{"answer": "1"}])
    with pytest.raises(ValueError, match="sample 0: .* holds no answer"):
        reward([r"\boxed{1}"], ["q"], [{"answer": "   "}])


def test_the_reward_runs_outside_the_main_thread():
    """math-verify's signal timeouts fail outside the main thread; the reward switches them off there."""
    result = {}

    def work():
        result["scores"] = MathVerifyReward()([r"\boxed{\frac12}"], ["q"], [{"answer": "0.5"}])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert result["scores"].tolist() == [1.0]


def test_the_reward_plugs_into_an_ensemble_of_texts():
    ensemble = RewardEnsemble({"math_verify": MathVerifyReward()})
    output = ensemble([r"\boxed{2}", r"\boxed{3}"], ["q", "q"], [{"answer": 2}, {"answer": 2}])
    assert output.scores["math_verify"].tolist() == [1.0, 0.0]


def test_extract_answer_balances_nested_braces_and_reads_gsm8k():
    assert boxed_answer(r"so \boxed{\frac{a}{b^{2}}} and more") == r"\frac{a}{b^{2}}"
    assert boxed_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_answer(r"\boxed{1} then \boxed{\sqrt{\frac{1}{2}}}") == r"\sqrt{\frac{1}{2}}"
    assert extract_answer(r"\fbox{x+1}") == "x+1"
    assert extract_answer("She has 3 + 4 = 7.\n#### 7\n") == "7"
    assert extract_answer("#### 1,000.") == "1,000"
    assert extract_answer("no answer here") is None
    assert extract_answer(r"\boxed{12") is None


# ---- data -----------------------------------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_math_style_jsonl_takes_the_boxed_answer_of_the_solution(tmp_path):
    file = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "What is 1/2 + 1/4?", "solution": r"It is $\boxed{\frac{3}{4}}$.", "level": "Level 2",
             "type": "Algebra", "unique_id": "test/algebra/1.json"},
            {"problem": "2+2?", "solution": r"\boxed{3} no, \boxed{4}", "answer": "4", "level": "Level 1"},
        ],
    )  # fmt: skip
    data = math_dataset(str(file))
    assert data.prompts == ["What is 1/2 + 1/4?", "2+2?"]
    assert data.metadata[0] == {
        "answer": r"\frac{3}{4}", "level": "Level 2", "type": "Algebra", "unique_id": "test/algebra/1.json",
    }  # fmt: skip
    assert data.metadata[1] == {"answer": "4", "level": "Level 1"}
    reward = MathVerifyReward()
    assert reward([r"\boxed{0.75}", r"\boxed{4}"], data.prompts, data.metadata).tolist() == [1.0, 1.0]


def test_gsm8k_style_jsonl_takes_the_answer_after_the_hashes(tmp_path):
    file = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [{"question": "Natalia sold 48 clips, then half as many. How many?", "answer": "48/2 = 24\n#### 72"}],
    )
    data = math_dataset(str(file))
    assert data.prompts == ["Natalia sold 48 clips, then half as many. How many?"]
    assert data.metadata == [{"answer": "72"}]
    assert len(math_dataset(str(write_jsonl(tmp_path / "two.jsonl", [{"question": "a", "answer": 1}] * 3)),
                            limit=2)) == 2  # fmt: skip


def test_keys_lists_numbers_and_parquet(tmp_path):
    olympiad = write_jsonl(
        tmp_path / "olympiad.jsonl",
        [{"id": 7, "question": "Find x and y.", "final_answer": ["$3$", "$4$"], "solution": ["long"]}],
    )
    assert math_dataset(str(olympiad)).metadata == [{"answer": "3, 4", "id": 7}]
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"q": "1+1?", "gt": 2.0, "prompt": "ignored"}])
    data = math_dataset(str(custom), question_key="q", answer_key="gt")
    assert data.prompts == ["1+1?"] and data.metadata == [{"answer": "2", "prompt": "ignored"}]
    table = pa.table({"id": [0, 1], "problem": ["A?", "B?"], "answer": ["204", "25"], "url": ["u0", "u1"]})
    pq.write_table(table, tmp_path / "test-00000-of-00001.parquet")
    data = math_dataset(str(tmp_path / "test-00000-of-00001.parquet"))
    assert data.prompts == ["A?", "B?"] and data.metadata[1] == {"answer": "25", "id": 1, "url": "u1"}


def test_data_errors_name_the_file_line_and_fix(tmp_path):
    file = tmp_path / "bad.jsonl"
    write_jsonl(file, [{"question": "ok?", "answer": "1"}, {"text": "where?", "answer": "2"}])
    message = (
        f"{re.escape(str(file))}:2: no question under 'problem' or 'question' or 'prompt' .*'answer', 'text'"
    )
    with pytest.raises(ValueError, match=message + r".*question_key"):
        math_dataset(str(file))
    write_jsonl(file, [{"problem": "ok?", "level": 1}])
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(file))}:1: no gold answer .*'level', 'problem'.*answer_key"
    ):
        math_dataset(str(file))
    write_jsonl(file, [{"problem": "ok?", "solution": "It is 4."}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}:1: 'solution' holds no answer .*boxed"):
        math_dataset(str(file))
    write_jsonl(file, [{"problem": "  ", "answer": "1"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}:1: 'problem' must be a non-empty string"):
        math_dataset(str(file))
    file.write_text("\n\n")
    with pytest.raises(ValueError, match="no questions in the file"):
        math_dataset(str(file))
    with pytest.raises(FileNotFoundError, match="no file at .*G2RPO_DATA"):
        math_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        math_dataset(str(tmp_path / "x.csv"))


def write_eval_sets(root):
    """One or two questions per evaluation set, in each repository's layout."""
    for name, spec in EVAL_SETS.items():
        folder = root / spec.folder
        if spec.files.endswith(".jsonl"):
            folder.mkdir(parents=True)
            write_jsonl(folder / spec.files, [{"problem": f"{name} one?", "answer": "1"},
                                              {"problem": f"{name} two?", "answer": "2"}])  # fmt: skip
        else:
            path = folder / spec.files.replace("**/", "data/").replace("*", "00000-of-00001")
            path.parent.mkdir(parents=True)
            pq.write_table(pa.table({"question": [f"{name} one?"], "answer": ["1"]}), path)


def test_eval_sets_are_found_in_their_layout_or_named_with_the_download_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prompt file at .* Get it with") as caught:
        eval_set("math500", root=str(tmp_path))
    assert (
        f"hf download HuggingFaceH4/MATH-500 --repo-type dataset --local-dir {tmp_path / 'MATH-500'} "
        "--include 'test.jsonl'" in str(caught.value)
    )
    write_eval_sets(tmp_path)
    assert len(eval_set("math500", root=str(tmp_path))) == 2
    assert eval_set("gsm8k", root=str(tmp_path)).metadata == [{"answer": "1"}]
    assert len(eval_set("aime24", root=str(tmp_path), limit=1)) == 1
    assert {name: spec.samples for name, spec in EVAL_SETS.items()} == {
        "math500": 1, "gsm8k": 1, "minerva": 1, "olympiadbench": 1, "aime24": 16, "amc23": 16,
    }  # fmt: skip
    with pytest.raises(ValueError, match="not known; choose one of math500"):
        eval_set("math5000", root=str(tmp_path))


# ---- evaluation -----------------------------------------------------------------------------------------


class Rollout:
    def __init__(self, texts):
        self.texts = texts


class CountingPolicy:
    """Answers question ``q`` right its first ``right[q]`` times, then wrong; no box for ``unboxed``."""

    def __init__(self, right: dict[str, int], unboxed: frozenset[str] = frozenset()):
        self.right, self.unboxed, self.asked, self.calls = right, unboxed, {}, []

    def sample_tokens(self, task, inputs, generators, temperature, max_new_tokens):
        assert task == "text" and len(generators) == len(inputs["questions"])
        self.calls.append((len(generators), temperature, max_new_tokens))
        texts = []
        for question in inputs["questions"]:
            seen = self.asked[question] = self.asked.get(question, 0) + 1
            answer = question.split("=")[1] if seen <= self.right[question] else "-1"
            texts.append(answer if question in self.unboxed else rf"\boxed{{{answer}}}")
        return Rollout(texts)


class DrawingPolicy:
    """Right when its generator's first draw is below 0.5: the answers depend on the generators alone."""

    def sample_tokens(self, task, inputs, generators, temperature, max_new_tokens):
        return Rollout(
            [
                rf"\boxed{{{q.rsplit('=', 1)[-1] if torch.rand((), generator=g) < 0.5 else 'nope'}}}"
                for q, g in zip(inputs["questions"], generators)
            ]
        )


def questions(answers):
    return PromptDataset(
        prompts=[f"q{i}={a}" for i, a in enumerate(answers)], metadata=[{"answer": a} for a in answers]
    )


def test_accuracy_is_the_mean_over_every_sample_avg_at_n():
    sets = {"easy": questions([1, 2]), "hard": questions([3, 4, 5])}
    policy = CountingPolicy(
        {"q0=1": 4, "q1=2": 2, "q0=3": 1, "q1=4": 0, "q2=5": 0}, unboxed=frozenset({"q2=5"})
    )
    evaluate = ReasoningAccuracy(
        sets, MathVerifyReward(format_reward=0.5), max_new_tokens=7, samples_per_question={"easy": 4},
        temperature=1.0, batch_size=3,
    )  # fmt: skip
    results = evaluate(policy)
    assert results["easy"] == pytest.approx((4 + 2) / 8)  # avg@4, the format reward left out
    assert results["hard"] == pytest.approx(1 / 3)  # one sample each (pass@1)
    assert results["hard/format"] == pytest.approx(2 / 3) and results["easy/format"] == 1.0
    assert results["overall"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert sum(n for n, _, _ in policy.calls) == 8 + 3
    assert {(t, m) for _, t, m in policy.calls} == {(1.0, 7)} and max(n for n, _, _ in policy.calls) == 3


def test_results_do_not_depend_on_the_batch_size():
    sets = {"a": questions(range(6)), "b": questions(range(4))}
    runs = [
        ReasoningAccuracy(
            sets, MathVerifyReward(), max_new_tokens=4, samples_per_question=8, batch_size=size
        )(DrawingPolicy())
        for size in (1, 5, 64)
    ]
    assert runs[0] == runs[1] == runs[2]
    assert 0.0 < runs[0]["a"] < 1.0  # the samples draw from generators of their own
    other_seed = ReasoningAccuracy(sets, MathVerifyReward(), max_new_tokens=4, samples_per_question=8, seed=1)
    assert other_seed(DrawingPolicy()) != runs[0]


def test_bad_evaluation_settings_are_named():
    sets = {"a": questions([1])}
    with pytest.raises(ValueError, match=r"names \['b'\], which are not among the sets \['a'\]"):
        ReasoningAccuracy(sets, MathVerifyReward(), max_new_tokens=4, samples_per_question={"b": 2})
    with pytest.raises(ValueError, match="must be >= 1"):
        ReasoningAccuracy(sets, MathVerifyReward(), max_new_tokens=4, samples_per_question=0)


# ---- configs --------------------------------------------------------------------------------------------


def test_the_configs_compose_and_build(compose_config, tmp_path, monkeypatch):
    monkeypatch.setenv("G2RPO_DATA", str(tmp_path))
    cfg = compose_config("reward=math_verify", "data=math_jsonl", "eval=math_reasoning")
    reward = instantiate(cfg.reward)
    assert reward([r"\boxed{\frac12}"], ["q"], [{"answer": "0.5"}]).scores["math_verify"].tolist() == [1.0]
    with pytest.raises(Exception, match="G2RPO_DATA"):
        instantiate(cfg.data)
    with pytest.raises(Exception, match="no prompt file at .* Get it with"):
        instantiate(cfg.eval)
    (tmp_path / "math").mkdir()
    write_jsonl(tmp_path / "math" / "train.jsonl", [{"problem": "1+1?", "answer": 2}])
    assert instantiate(cfg.data).metadata == [{"answer": "2"}]
    write_eval_sets(tmp_path)
    evaluator = instantiate(cfg.eval)
    accuracy = evaluator.understanding
    assert accuracy.samples == {
        "math500": 1, "gsm8k": 1, "minerva": 1, "olympiadbench": 1, "aime24": 16, "amc23": 16,
    }  # fmt: skip
    assert (accuracy.temperature, accuracy.max_new_tokens) == (1.0, 3072)
    evaluation = evaluator(DrawingPolicy())
    table = evaluation.scores["math/accuracy"]
    assert set(table) == {*EVAL_SETS, *(f"{name}/format" for name in EVAL_SETS), "overall"}
