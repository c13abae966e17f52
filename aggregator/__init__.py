"""The aggregator: the server side of a networked federation (round coordination, checkpoints,
and the server side of each transport). It drives gefl's federation state machine; the round
logic itself stays in gefl."""
