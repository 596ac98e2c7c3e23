"""User environments for the tests, given to the trainer as `env_fns:Class` (tests/ is on the
path of the test process and, through PYTHONPATH, of its actors)."""
from grpo_ray.envs import EnvStep


class Echo:
    """Answers every turn with a fixed observation, `turns` times, then ends (reward: none, the
    verifier scores; or `reward`)."""

    def __init__(self, turns: int = 2, observation: str = "\n#### 7\n", reward: float | None = None):
        self.turns, self.text, self.reward, self.seen = turns, observation, reward, 0

    def reset(self, record):
        return ""

    def step(self, completion):
        self.seen += 1
        if self.seen >= self.turns:
            return EnvStep(reward=self.reward, done=True)
        return EnvStep(observation=self.text, tool_calls=1)


class Broken:
    """step raises on the second turn, or returns the wrong type (mode)."""

    def __init__(self, mode: str = "raise"):
        self.mode, self.seen = mode, 0

    def reset(self, record):
        return ""

    def step(self, completion):
        self.seen += 1
        if self.seen < 2:
            return EnvStep(observation="\nok\n")
        if self.mode == "raise":
            raise KeyError("the env's own bug")
        return {"observation": "not an EnvStep"}


class Flood:
    """An observation longer than any context: the trajectory is cut at the limit."""

    def reset(self, record):
        return ""

    def step(self, completion):
        return EnvStep(observation=" 1" * 5000)


NotAnEnv = 42


class Sleepy:
    """Each step waits `seconds` (a slow tool) before answering, `turns` times."""

    def __init__(self, seconds: float = 0.5, turns: int = 2):
        self.seconds, self.turns, self.seen = seconds, turns, 0

    def reset(self, record):
        return ""

    def step(self, completion):
        import time

        time.sleep(self.seconds)
        self.seen += 1
        return EnvStep(observation="\nz\n", done=self.seen >= self.turns)
