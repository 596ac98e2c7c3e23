"""User verifiers for tests, referenced by dotted path ("reward_fns:digit_fraction")."""


def digit_fraction(record, response):
    """A dense reward (share of digit characters) so even an untrained model's groups vary."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)
