"""BLEU (sacreBLEU) as an `evaluate` metric, loaded from this file so nothing is fetched from the hub."""

import datasets
import evaluate


class Bleu(evaluate.Metric):
    """Corpus BLEU on a 0-100 scale, plus smoothed sentence BLEU for each example."""

    def _info(self):
        return evaluate.MetricInfo(
            description=(
                "sacreBLEU corpus BLEU (13a tokenizer) and exponentially smoothed sentence BLEU, one reference each."
            ),
            citation="Post, A Call for Clarity in Reporting BLEU Scores, 2018.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        import sacrebleu

        corpus = sacrebleu.corpus_bleu(predictions, [references]).score if predictions else 0.0
        each = [sacrebleu.sentence_bleu(pred, [ref]).score for pred, ref in zip(predictions, references)]
        return {"bleu": corpus, "bleu_each": each}
