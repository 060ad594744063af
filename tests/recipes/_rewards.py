"""A reward for the tiny random model, whose answers are never right: it still varies within a group, so
the policy gets a real gradient (verl's compute_score signature, loaded with --reward-fn FILE:letter_share)."""


def letter_share(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """Share of the response's characters that are lowercase ASCII letters."""
    return sum("a" <= c <= "z" for c in solution_str) / max(len(solution_str), 1)


def letter_share_logged(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """letter_share as verl's dict result {"score", "chars"} (the extra key is logged as reward/chars/mean),
    and for training prompts a line "<prompt index>\\t<score>" appended to the file named by
    $RLPRIMS_TEST_SCORE_LOG (when set): the test recomputes a step's global max / min from it."""
    import os

    score = letter_share(data_source, solution_str, ground_truth, extra_info)
    path = os.environ.get("RLPRIMS_TEST_SCORE_LOG")
    if path and (extra_info or {}).get("split") == "train":
        with open(path, "a") as f:
            f.write(f"{extra_info['index']}\t{score!r}\n")
    return {"score": score, "chars": len(solution_str)}


def letter_share_stalls_once_on_rank1(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """letter_share, except that the first training call on rank 1 never returns: it takes the marker
    file named by $RLPRIMS_TEST_STALL_MARK (created once, atomically) and sleeps for ~11 days."""
    import os
    import time

    if os.environ.get("RANK") == "1" and (extra_info or {}).get("split") == "train":
        try:
            os.close(os.open(os.environ["RLPRIMS_TEST_STALL_MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            time.sleep(10**6)
    return letter_share(data_source, solution_str, ground_truth, extra_info)
