"""A reward for the tiny random model, whose answers are never right: it still varies within a group, so
the policy gets a real gradient (verl's compute_score signature, loaded with --reward-fn FILE:letter_share)."""


def letter_share(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """Share of the response's characters that are lowercase ASCII letters."""
    return sum("a" <= c <= "z" for c in solution_str) / max(len(solution_str), 1)
