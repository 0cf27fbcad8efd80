"""Verifiers for the tests' tiny grpo.py runs (python grpo.py --verifier=tests.grpo_checks:shorter)."""


def shorter(question, answer, reference):
    """Shorter answers score higher: a reward every tiny model's samples spread over."""
    return max(0.0, 1 - len(answer) / 12)
