"""The judge of the bundled task: VADER's compound sentiment score of a text, in [-1, 1].

VADER (vaderSentiment on PyPI) is a lexicon-and-rules scorer whose lexicon ships inside the
package: deterministic, a few microseconds a text, nothing to download. A neural sentiment
classifier would need weights from a model hub, which dpo-lora's installs do not assume.
The same function labels the pairs (data/make_sentiment.py) and scores the demo's samples
(`dpo-lora generate --reward data.sentiment_scorer:score`), so "after" is measured by the judge
the pairs were labelled with.
"""

from __future__ import annotations

import functools


@functools.cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def score(text: str) -> float:
    return float(_analyzer().polarity_scores(text)["compound"])
