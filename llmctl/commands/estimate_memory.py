"""placeholder until the memory API lands"""


def estimate_memory(model: str) -> None:
    """Estimate memory."""
