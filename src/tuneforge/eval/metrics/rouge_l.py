"""ROUGE-L F-measure as an `evaluate` metric, loaded from this file so nothing is fetched from the hub."""

import datasets
import evaluate


class RougeL(evaluate.Metric):
    """Longest-common-subsequence overlap between an answer and its reference, averaged over examples."""

    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure (rouge_score, Porter stemming), per example and averaged.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        each = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rouge_l": sum(each) / len(each) if each else 0.0, "rouge_l_each": each}
