"""An example reward function for configs/grpo_tiny.yaml: called as f(prompt, completion, row) -> float, with the
prompt as rendered text, the completion as decoded text and the dataset row the prompt came from."""


def distinct_words(prompt: str, completion: str, row: dict) -> float:
    """The share of distinct words in the completion: rewards answers that do not repeat themselves."""
    words = completion.split()
    return len(set(words)) / len(words) if words else 0.0
