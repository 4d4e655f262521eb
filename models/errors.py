"""The one exception models/ raises for a wrong argument: a model name, a value out of range, a
checkpoint that does not fit. Its message names the argument (`drop_path_rate`, `model_key`),
never a command-line flag: models/ knows nothing of the scripts. Callers that speak to people
report it as one line; the scripts add their flag names (util/trainer.py)."""


class ModelError(ValueError):
    """A wrong argument to a function of models/; the message says what is wrong and the fix."""
