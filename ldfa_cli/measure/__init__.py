"""The instruments: PyTorch's FLOP counter with each op filed under its layer and phase
(``flops.py``), and the costs it does not know (``costs.py``: elementwise work, matrix
decompositions, optimizer steps). They observe whatever runs inside them and know nothing
of recipes or training; the engine meters its step with them, the analyses report."""
