"""DeepConf's selectors in `sprm eval` (`best_of_k.selection_metrics`): confidence only (the finished candidate with
the highest lowest-window confidence) and the confidence-weighted vote, on hand-made samples; absent when the engine
gave no confidence (the HF engine)."""

from sprm_kernels.model.evaluation.best_of_k import selection_metrics
from sprm_kernels.model.shipped import task


def samples_for(problem, confidence):
    right, wrong = problem.answer, problem.answer + 1
    answers = [wrong, right, wrong, wrong]
    return {
        "correct": [[a == right for a in answers]],
        "finished": [[True, True, True, False]],
        "scores": [[0.9, 0.1, 0.2, 0.99]],  # the SPRM head prefers a wrong one (and an unfinished one most)
        "answers": [answers],
        "texts": [["", "", "", ""]],
        "confidence": [confidence],
    }


def test_confidence_only_and_confidence_weighted_vote():
    problem = task.problems("test", 1, seed=0)[0]
    samples = samples_for(problem, [11.0, 12.5, 10.0, 13.0])  # the unfinished one is the most confident
    result = selection_metrics(samples, [problem], ks=(4,), seed=0)
    assert result["confidence"][4].tolist() == [1.0]  # row 1: finished first, then the highest confidence
    assert result["sprm"][4].tolist() == [0.0]
    # weights: wrong 11 + 10 + 13 = 34 against right 12.5: the vote goes wrong; with right much more confident, right
    assert result["confidence_vote"][4].tolist() == [0.0]
    heavy = selection_metrics(samples_for(problem, [1.0, 40.0, 1.0, 1.0]), [problem], ks=(4,), seed=0)
    assert heavy["confidence_vote"][4].tolist() == [1.0] and heavy["majority"][4].tolist() == [0.0]
    plain = selection_metrics(samples_for(problem, [None] * 4), [problem], ks=(4,), seed=0)
    assert "confidence" not in plain and "confidence_vote" not in plain
