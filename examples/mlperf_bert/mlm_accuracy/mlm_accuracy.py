"""Masked-LM accuracy, MLPerf BERT's quality metric, as an `evaluate` module loaded by path
(`evaluate.load("examples/mlperf_bert/mlm_accuracy")`), so no Hub access is needed.

accuracy = (# masked positions whose arg-max prediction equals the original token) / (# masked positions),
pooled over the whole eval set (not averaged per sequence). References equal to `ignore_index`
(the padding of the fixed-width prediction slots) are not counted.
"""

import datasets
import evaluate
import numpy as np

_CITATION = ""
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): arg-max token id at each prediction slot.
    references (list of int): original token id at each slot, or ignore_index for an empty slot.
    ignore_index (int): reference value of empty slots, default -100.
Returns:
    accuracy (float), count (int): pooled masked-LM accuracy and the number of masked positions.
Example:
    >>> m = evaluate.load("examples/mlperf_bert/mlm_accuracy")
    >>> m.compute(predictions=[5, 7, 1], references=[5, 8, -100])
    {'accuracy': 0.5, 'count': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MlmAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, ignore_index=-100):
        pred = np.asarray(predictions, dtype=np.int64)
        ref = np.asarray(references, dtype=np.int64)
        keep = ref != ignore_index
        count = int(keep.sum())
        if count == 0:
            raise ValueError("no masked positions to score")
        return {"accuracy": float((pred[keep] == ref[keep]).mean()), "count": count}
