"""What every package of the suite shares, in the standard library alone: one-line command-line
errors (:mod:`common.cli`) and what a run folder's files say about its run (:mod:`common.run_state`).

Every package may import it (tests/test_dependencies.py); it imports nothing of the project.
"""
