"""The fine-tuning part of the services facade: training data, fine-tune jobs and
adapter versions. Mixed into ``Services``; every method takes the acting
Principal and checks the GPT is theirs before touching anything.
"""

from __future__ import annotations


class FinetuneMethods:
    pass
