"""Analysis: the linear theory, FLOP counting, receptive fields."""
