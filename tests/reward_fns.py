"""User verifiers for tests, referenced by dotted path ("reward_fns:digit_fraction")."""


def digit_fraction(record, response):
    """A dense reward (share of digit characters) so even an untrained model's groups vary."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def hang_once(record, response):
    """Hangs (20 s) the first time it sees record["marker"] missing, then answers at once: a
    replica stuck on one request, for the verifier pool's timeout-and-resend test."""
    import os
    import time

    if not os.path.exists(record["marker"]):
        open(record["marker"], "w").close()
        time.sleep(20)
    return 1.0


def crash_once(record, response):
    """Kills its own process (the replica) the first time it sees record["marker"] missing: a
    replica that dies with a request in flight, for the verifier pool's resend test."""
    import os

    if not os.path.exists(record["marker"]):
        open(record["marker"], "w").close()
        os._exit(1)
    return 1.0


def hang_always(record, response):
    import time

    time.sleep(20)
    return 1.0


def uniform_for_even(record, response):
    """Prompt i (answer 2i) scores 1.0 for every completion when i is even (a group of equal
    rewards: dynamic sampling drops it), else the dense digit fraction."""
    i = int(record["answer"]) // 2
    return 1.0 if i % 2 == 0 else digit_fraction(record, response)


def has_digit(record, response):
    """1 when the response contains a digit: an untrained tiny model passes sometimes."""
    return float(any(c.isdigit() for c in response))


def now(record, response):
    """The wall-clock time of the check as its reward: when the pool scored it."""
    import time

    return time.time()
