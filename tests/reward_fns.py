"""User verifiers for tests, referenced by dotted path ("reward_fns:digit_fraction")."""


def digit_fraction(record, response):
    """A dense reward (share of digit characters) so even an untrained model's groups vary."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


class _InCaller:
    """A return value that runs fn(*args) where it is unpickled: in the process that called the
    reward function (the verifier replica), not in the worker process that runs user functions
    under their time limit (grpo_ray/verifiers/user.py), which a hang or a crash of the function
    itself cannot get past. How the pool's tests make a replica hang or die with a request in
    flight."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def hang_once(record, response):
    """The first time it sees record["marker"] missing, holds the replica's thread for 20 s,
    then answers at once: a replica stuck on one request, for the verifier pool's
    timeout-and-resend test."""
    import os
    import time

    if not os.path.exists(record["marker"]):
        open(record["marker"], "w").close()
        return _InCaller(time.sleep, 20)
    return 1.0


def crash_once(record, response):
    """Kills the replica the first time it sees record["marker"] missing: a replica that dies
    with a request in flight, for the verifier pool's resend test."""
    import os

    if not os.path.exists(record["marker"]):
        open(record["marker"], "w").close()
        return _InCaller(os._exit, 1)
    return 1.0


def hang_always(record, response):
    """Holds the replica's thread for 20 s (the retries-run-out test)."""
    import time

    return _InCaller(time.sleep, 20)


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


def raise_on_odd(record, response):
    """Raises for odd answers (a bug that only some rows hit), else the dense digit fraction."""
    if int(record["answer"]) % 2:
        raise ValueError(f"bad input {record['answer']}")
    return digit_fraction(record, response)


def always_raises(record, response):
    raise ValueError("bad input")


def sleep_forever(record, response):
    """Never answers within any time limit."""
    import time

    while True:
        time.sleep(60)


def nan_reward(record, response):
    return float("nan")


def constant(record, response):
    """A trivial function: what a call costs on top of the function itself."""
    return 0.5


def fading(record, response):
    """1.0 for the first record["budget"] calls (counted in the file record["counter"]), then 0: a
    capability that is there at the first evaluation and gone at the next."""
    import os

    with open(record["counter"], "a") as f:
        f.write(".")
    return 1.0 if os.path.getsize(record["counter"]) <= record["budget"] else 0.0


def dip(record, response):
    """0 for the calls numbered record["budget"]+1 .. record["budget"]+record["width"] (counted in
    the file record["counter"]), 1.0 before and after: a capability lost at one evaluation and
    back at the next (a retention rollback that helped)."""
    import os

    with open(record["counter"], "a") as f:
        f.write(".")
    n = os.path.getsize(record["counter"])
    return 0.0 if record["budget"] < n <= record["budget"] + record["width"] else 1.0
