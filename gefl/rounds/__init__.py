"""The round loop and what it keeps: the federation's state machine, the one driver of rounds
(RoundLoop, for simulation and deployment alike), the training round logic, the scoreboard, the
checkpoint and the run directory.
"""
