"""Classification accuracy as an `evaluate` module loaded by path
(`evaluate.load("examples/metrics/accuracy")`), so no Hub access is needed.

accuracy = (# examples whose predicted label equals the reference) / (# examples). With `num_labels`
given, the per-class accuracy (recall) is returned too, which shows whether a classifier that looks
good on average ignores a class.
"""

import datasets
import evaluate
import numpy as np

_CITATION = ""
_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted label of each example.
    references (list of int): true label of each example.
    num_labels (int, optional): number of classes; adds `per_class` (accuracy within each class,
        None for a class absent from the references).
Returns:
    accuracy (float), count (int), and per_class (list) when num_labels is given.
Example:
    >>> m = evaluate.load("examples/metrics/accuracy")
    >>> m.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'count': 3}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=None):
        pred = np.asarray(predictions, dtype=np.int64)
        ref = np.asarray(references, dtype=np.int64)
        if ref.size == 0:
            raise ValueError("no examples to score")
        out = {"accuracy": float((pred == ref).mean()), "count": int(ref.size)}
        if num_labels is not None:
            if ref.min() < 0 or ref.max() >= num_labels:
                raise ValueError(f"references must lie in [0, {num_labels}), got "
                                 f"[{ref.min()}, {ref.max()}]")
            out["per_class"] = [float((pred[ref == c] == c).mean()) if (ref == c).any() else None
                                for c in range(num_labels)]
        return out
