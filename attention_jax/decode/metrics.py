"""Translation quality: sacreBLEU and chrF on detokenized, case-sensitive text.

These are the numbers comparable to published WMT results (the paper's 27.3 / 28.4 BLEU on
newstest2014 are tokenized BLEU, a point or so above sacreBLEU's). Each score comes with
sacreBLEU's signature, which records everything that changes the number.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; "
            "one reference per hypothesis"
        )
    if not hypotheses:
        raise ValueError("no sentences to score")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus sacreBLEU (13a tokenization, exp smoothing) and its signature."""
    _check(hypotheses, references)
    metric = sacrebleu.BLEU(force=True)  # our detokenized output may end in " ." legitimately
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Corpus chrF (character n-gram F-score, beta 2) and its signature."""
    _check(hypotheses, references)
    metric = sacrebleu.CHRF()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())
